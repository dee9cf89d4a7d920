"""Stop rules and outcomes. Reasons double as the operator's condition reasons."""

from __future__ import annotations

import re
from dataclasses import dataclass

from qtune.tuning.history import FAILED, History, TrialRecord

GOAL_REACHED = "GoalReached"
SEARCH_EXHAUSTED = "SearchExhausted"
MAX_TRIALS = "MaxTrialsReached"
TIMEOUT = "Timeout"
TOO_MANY_FAILURES = "TooManyFailedTrials"
NO_CONFIG = "NoConfigMeetsCriterion"
NO_SPEEDUP = "NoSpeedup"
"""Some configs meet the accuracy criterion, but none is faster than fp32 (or than minSpeedup)
beyond measurement doubt."""
BASELINE_FAILED = "BaselineFailed"
ABANDONED = "Abandoned"
"""A running trial stopped because the job stopped (e.g. too many failed trials)."""
REPEATED_FAILURES = "RepeatedFailures"
"""The last spec.tuning.maxConsecutiveFailures trials failed the same way (e.g. every one OOMKilled): more
trials would fail alike. A failure outcome even when a passing config was found (it is still reported)."""

BACKOFF_FIRST_SECONDS = 5.0
BACKOFF_MAX_SECONDS = 60.0
"""After an infrastructure failure the next start waits 5 s, doubling with each further one in a row, at most 60 s."""
INFRA_REASONS = frozenset({
    "OOMKilled", "Crashed", "MetricsUnavailable", "Evicted", "Preempting", "NodeLost", "Shutdown", "Terminated",
    "ErrImagePull", "ImagePullBackOff", "CreateContainerConfigError", "CreateContainerError", "RunnerError", "Other",
})
"""Failures of the place a unit ran in rather than of its config: the next start backs off."""
_REASON_ONLY = frozenset({"OOMKilled", "Timeout", "MetricsUnavailable", "Evicted", "Preempting", "NodeLost",
                          "Shutdown", "Terminated", "ErrImagePull", "ImagePullBackOff"})
"""Failures alike by their reason alone; others (Crashed, TrialError ...) also need the same kind of message."""
_HINTS = {
    "OOMKilled": "raise spec.trial.resources.memory",
    "Timeout": "raise spec.tuning.trialTimeoutSeconds",
    "ErrImagePull": "check spec.trial.image and the image pull secrets",
    "ImagePullBackOff": "check spec.trial.image and the image pull secrets",
    "MetricsUnavailable": "check the operator's Prometheus and Pushgateway settings",
}

SUCCESS_OUTCOMES = frozenset({GOAL_REACHED, SEARCH_EXHAUSTED, MAX_TRIALS, TIMEOUT, TOO_MANY_FAILURES})
"""Outcomes with a winner that meets the criterion (and, for latency, is faster than fp32)."""

EXIT_SUCCESS, EXIT_NO_CONFIG, EXIT_NO_SPEEDUP, EXIT_FAILED = 0, 3, 4, 5
"""`qtune tune`'s exit codes for a finished run (1 is bad input or an unexpected error, said by the CLI)."""


def succeeded(outcome: str) -> bool:
    """THE success rule: `qtune tune` exits 0 and a QuantizationJob ends Succeeded exactly for these."""
    return outcome in SUCCESS_OUTCOMES


def exit_code(outcome: str) -> int:
    """The exit code of a run that ended with `outcome`: 0 on success, 3 when no config met the criterion,
    4 when none was faster than minSpeedup, 5 for every other failure (RepeatedFailures, BaselineFailed:
    the verdict line says why; a best config found before it is still written)."""
    if succeeded(outcome):
        return EXIT_SUCCESS
    return {NO_CONFIG: EXIT_NO_CONFIG, NO_SPEEDUP: EXIT_NO_SPEEDUP}.get(outcome, EXIT_FAILED)


def failure_class(reason: str | None, message: str | None) -> str:
    """What makes two failures alike: the reason, plus for reasons that cover many causes (Crashed,
    TrialError, ...) the first line of the message with numbers and hex ids blanked out."""
    reason = reason or "Failed"
    if reason in _REASON_ONLY:
        return reason
    first = ((message or "").strip().splitlines() or [""])[0]
    return f"{reason}|" + re.sub(r"0x[0-9a-fA-F]+|[0-9a-f]{8,}|\d+", "#", first)[:160]


def _finished_in_order(history: History) -> list[TrialRecord]:
    """Finished trials in index order, without those the session itself abandoned."""
    return [t for t in sorted(history.trials, key=lambda t: t.index) if t.done and t.reason != ABANDONED]


def failure_streak(history: History) -> list[TrialRecord]:
    """The trailing run of failed trials that failed alike (empty when the last finished trial passed)."""
    streak: list[TrialRecord] = []
    for record in reversed(_finished_in_order(history)):
        if record.status != FAILED:
            break
        if streak and failure_class(record.reason, record.message) != failure_class(streak[0].reason,
                                                                                      streak[0].message):
            break
        streak.append(record)
    return streak


def infra_streak(history: History) -> list[TrialRecord]:
    """The trailing run of infrastructure failures (any such reasons), newest first."""
    streak: list[TrialRecord] = []
    for record in reversed(_finished_in_order(history)):
        if record.status != FAILED or record.reason not in INFRA_REASONS:
            break
        streak.append(record)
    return streak


def backoff_seconds(failures_in_a_row: int) -> float:
    if failures_in_a_row <= 0:
        return 0.0
    return min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** (failures_in_a_row - 1))


def describe_repeated(streak: list[TrialRecord]) -> str:
    """`3 trials in a row were OOMKilled (trials 4, 5, 6): <message>; raise ...` (newest first in `streak`)."""
    newest = streak[0]
    reason = newest.reason or "Failed"
    indices = ", ".join(str(t.index) for t in reversed(streak))
    message = (newest.message or "").strip().replace("\n", " ")[:400]
    text = f"{len(streak)} trials in a row were {reason} (trials {indices})" + (f": {message}" if message else "")
    hint = _HINTS.get(reason)
    return f"{text}; {hint}" if hint else text


@dataclass(frozen=True)
class StopRules:
    max_trials: int
    max_failed_trials: int | None
    timeout_seconds: float
    max_consecutive_failures: int = 0
    """Stop when this many trials in a row failed alike (0: never)."""

    def budget(self, history: History) -> int:
        """How many more trials may be started."""
        return max(0, self.max_trials - len(history.trials))

    def hard_stop(self, history: History, elapsed_seconds: float) -> str | None:
        """A reason to stop now, abandoning running work; None to go on."""
        if self.timeout_seconds and elapsed_seconds >= self.timeout_seconds:
            return TIMEOUT
        if self.max_failed_trials is not None and len(history.failed()) >= self.max_failed_trials:
            return TOO_MANY_FAILURES
        if self.max_consecutive_failures and len(failure_streak(history)) >= self.max_consecutive_failures:
            return REPEATED_FAILURES
        return None
