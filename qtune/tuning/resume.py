"""THE resume policy: whether a finished run goes on, locally (`qtune tune --resume`) and on the cluster
(an edited QuantizationJob). A run stopped by a budget goes on when that budget was raised above what the
run used; a run that stopped for any other reason does not go on by itself.

| stop reason          | goes on when (the possibly edited spec.tuning)            |
|----------------------|-----------------------------------------------------------|
| MaxTrialsReached     | maxTrials > the trials run                                 |
| Timeout              | timeoutSeconds is 0 (none) or > the elapsed tuning time    |
| TooManyFailedTrials  | maxFailedTrials is unset or > the failed trials            |
| anything else        | never (GoalReached, SearchExhausted, NoSpeedup, ...)       |

BaselineFailed is not a budget and keeps its own handling in each executor: locally a fresh history, on
the cluster the baseline runs again once the spec was edited.
"""

from __future__ import annotations

from qtune.spec.models import JobSpec
from qtune.tuning import stop
from qtune.tuning.history import History


def resume_message(stop_reason: str | None, *, trials: int, elapsed_seconds: float, failed_trials: int,
                   spec: JobSpec) -> str | None:
    """Why the run stopped with `stop_reason` goes on under `spec` (a line a person reads), None when it
    does not. `trials`: trials run (started); `elapsed_seconds`: the run's tuning time; `failed_trials`: the
    trials recorded failed (abandoned ones included, as the stop rule counts them)."""
    tuning = spec.tuning
    if stop_reason == stop.MAX_TRIALS and tuning.max_trials > trials:
        return f"maxTrials is {tuning.max_trials}, {trials} trials ran: tuning continues"
    if stop_reason == stop.TIMEOUT and (not tuning.timeout_seconds or tuning.timeout_seconds > elapsed_seconds):
        limit = f"{tuning.timeout_seconds}s" if tuning.timeout_seconds else "none"
        return f"timeoutSeconds is {limit}, {elapsed_seconds:.0f}s were used: tuning continues"
    if stop_reason == stop.TOO_MANY_FAILURES and (tuning.max_failed_trials is None
                                                  or tuning.max_failed_trials > failed_trials):
        limit = tuning.max_failed_trials if tuning.max_failed_trials is not None else "unset"
        return f"maxFailedTrials is {limit}, {failed_trials} trials failed: tuning continues"
    return None


def resumes(stop_reason: str | None, *, trials: int, elapsed_seconds: float, failed_trials: int,
            spec: JobSpec) -> bool:
    """Whether a run that stopped with `stop_reason` goes on under `spec` (see the module's table)."""
    return resume_message(stop_reason, trials=trials, elapsed_seconds=elapsed_seconds,
                          failed_trials=failed_trials, spec=spec) is not None


def history_resume_message(history: History, spec: JobSpec, now: float) -> str | None:
    """`resume_message` of a finished run, from its history (History.elapsed: stopped with the run, so final)."""
    return resume_message(history.stop_reason, trials=len(history.trials), elapsed_seconds=history.elapsed(now),
                          failed_trials=len(history.failed()), spec=spec)
