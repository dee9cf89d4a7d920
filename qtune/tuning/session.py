"""The tuning session: the one engine behind `qtune tune` and the operator (see docs/engine.md).

A session owns a job's whole lifecycle: the baseline, proposing trials, recording results, the
stop rules, timeouts, the failure policy, the final confirmation and the winner. Executors only
start, poll and cancel units of work (local processes or pods) and feed the session what they
observed. Its only state is the History (plus the space the baseline produced), so either
executor rebuilds it from storage at any time and continues where the job was.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from qtune.protocol import (
    BaselineResult,
    ConfirmResult,
    SpeedMeasurement,
    TrialResult,
    UnitKind,
)
from qtune.protocol import trial_unit as trial_unit_id
from qtune.protocol import unit_trial_index as trial_of
from qtune.spec.models import JobSpec
from qtune.tuning import stop
from qtune.tuning.config import TuneConfig
from qtune.tuning.contenders import EXTRA_PASSES
from qtune.tuning.criterion import Criterion
from qtune.tuning.history import (
    DECODE_KEY,
    FAILED,
    SUCCEEDED,
    Backoff,
    Baseline,
    Confirmation,
    History,
    TrialRecord,
)
from qtune.tuning.objective import rank_by_speed, select_best, speed_of
from qtune.tuning.space import TuningSpace
from qtune.tuning.strategies import create_strategy

logger = logging.getLogger(__name__)

CONFIRM_MARGIN = 1.5
"""The confirmation's time is estimated as its passes times a trial's benchmark time, times this (loading
and rebuilding the candidates, warm-up)."""


COPIED_RESULT_FIELDS = tuple(name for name in TrialResult.model_fields
                             if name in TrialRecord.__dataclass_fields__ and name not in ("status", "config_key"))
"""The figures `record_trial` copies from a TrialResult into its TrialRecord: every field both have, so a new
per-trial figure needs only its field in each (and the surfaces that show it)."""


def objective_batch_size(spec: JobSpec) -> int | str:
    """Latency objective: the key of the speed figure it decides on: the time per new token (`DECODE_KEY`) of a
    job with spec.benchmark.decode, else the largest benchmarked batch size (where int8 pays most)."""
    return DECODE_KEY if spec.benchmark.decode is not None else max(spec.benchmark.batch_sizes)


@dataclass(frozen=True)
class WorkUnit:
    """One unit of work an executor runs: the baseline, a trial, or the final confirmation."""

    id: str
    kind: UnitKind
    trial: int | None = None
    tune_config: TuneConfig | None = None
    candidates: tuple[int, ...] = ()
    candidate_configs: dict[str, TuneConfig] = field(default_factory=dict, compare=False, hash=False)
    """confirm: trial index (str) -> tune config, so the runner can rebuild each candidate."""
    full_evaluation: bool = False
    """trial: evaluate in full even once the criterion cannot be met (see Strategy.needs_full_evaluation)."""

    @classmethod
    def baseline(cls) -> WorkUnit:
        return cls(UnitKind.BASELINE.value, UnitKind.BASELINE)

    @classmethod
    def for_trial(cls, record: TrialRecord) -> WorkUnit:
        return cls(trial_unit_id(record.index), UnitKind.TRIAL, record.index, record.tune_config,
                   full_evaluation=record.full_evaluation)


@dataclass
class Decision:
    """What the executor must do now."""

    start: list[WorkUnit] = field(default_factory=list)
    cancel: list[str] = field(default_factory=list)
    """Unit ids to stop; the session has already recorded them."""
    finished: str | None = None
    """The search's stop reason once the job is over (see `outcome()` for the final verdict)."""
    wait: float | None = None
    """Seconds until the session wants to be asked again (a backoff after failures): nothing starts before."""

    @property
    def changed(self) -> bool:
        return bool(self.start or self.cancel or self.finished)


class TuningSession:
    def __init__(self, spec: JobSpec, history: History, space: TuningSpace | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.spec = spec
        self.history = history
        self.space = space
        self.clock = clock
        """The one clock of the job (wall seconds): its elapsed time, the trials' start and end. The operator
        passes its Services.clock, tests a fake one."""
        tuning = spec.tuning
        self.criterion = Criterion.from_spec(tuning.accuracy_criterion)
        self.batch_size = objective_batch_size(spec)
        self.strategy = create_strategy(tuning.strategy, tuning.seed, objective=tuning.objective,
                                        min_speedup=tuning.min_speedup, batch_size=self.batch_size)
        self.strategy.criterion = self.criterion
        self.rules = stop.StopRules(tuning.max_trials, tuning.max_failed_trials, float(tuning.timeout_seconds),
                                    tuning.max_consecutive_failures)

    @property
    def baseline(self) -> Baseline | None:
        return self.history.baseline

    def elapsed(self) -> float:
        """The job's tuning time now (History.elapsed on the session's clock)."""
        return self.history.elapsed(self.clock())

    @property
    def ready(self) -> bool:
        """The baseline and the space are known: trials can be proposed."""
        return self.history.baseline is not None and self.space is not None

    # --- the loop's one step ----------------------------------------------------------------
    def advance(self, running: set[str] | frozenset[str], capacity: int) -> Decision:
        """Decide what to start, stop or finish, given the units running now and how many may run at once.
        The job's clock (baseline included) runs from the first call until the job finishes."""
        history = self.history
        if history.stop_reason is not None:
            return Decision(cancel=sorted(running), finished=history.stop_reason)
        now = self.clock()
        history.start_clock(now)
        elapsed_seconds = history.elapsed(now)
        if not self.ready:
            if UnitKind.BASELINE in running:
                return self._maybe_timeout(elapsed_seconds, running) or Decision()
            return self._maybe_timeout(elapsed_seconds, running) or Decision(start=[WorkUnit.baseline()])

        hard = self._maybe_timeout(elapsed_seconds, running)
        if hard is not None:
            return hard
        if UnitKind.CONFIRM in running:
            return Decision()
        wait = self._backoff(elapsed_seconds)
        if wait is not None:
            return Decision(wait=wait)

        free = max(0, capacity - len(running))
        start: list[WorkUnit] = []
        for record in sorted(history.pending(), key=lambda t: t.index):
            if trial_unit_id(record.index) not in running and len(start) < free:
                start.append(WorkUnit.for_trial(record))  # e.g. left pending by an interrupted run
        free -= len(start)
        time_left = self._time_for_a_trial(elapsed_seconds)
        if free > 0 and time_left:
            start += [WorkUnit.for_trial(r) for r in self.start_trials(free)]
        if start or running or history.pending():
            return Decision(start=start)

        reason = self.finished_reason()
        if reason is None:  # the strategy proposes nothing (it is done), or no trial fits in the time left
            reason = stop.SEARCH_EXHAUSTED if time_left else stop.TIMEOUT
        confirm = self.confirmation_unit()
        if confirm is not None:
            return Decision(start=[confirm])
        return self._finish(reason)

    def _time_for_a_trial(self, elapsed_seconds: float) -> bool:
        """Whether a new trial can still finish before `timeoutSeconds`, leaving time for the final
        confirmation once a passing config was measured: a trial the wall-clock limit would cut short
        is wasted, and without the confirmation the winner rests on figures taken minutes apart.
        Judged from the trials so far (median unit time); always True before any finished."""
        limit = self.rules.timeout_seconds
        durations = sorted(t.finished_at - t.started_at for t in self.history.trials
                           if t.done and t.started_at is not None and t.finished_at is not None
                           and t.finished_at >= t.started_at)
        if not limit or not durations:
            return True
        need = durations[len(durations) // 2]
        tuning = self.spec.tuning
        measured = sorted(t.timings["benchmark"] for t in self.history.trials
                          if t.ok and t.passed and t.speed and t.timings.get("benchmark"))
        if tuning.objective == "latency" and tuning.confirm_candidates > 0 and measured:
            # every pass of the confirmation takes about what one trial's benchmark took (the same time
            # budget per batch size), plus loading the models: keep time for all its passes
            need += CONFIRM_MARGIN * (1 + EXTRA_PASSES) * measured[len(measured) // 2]
        return elapsed_seconds + need <= limit

    def _backoff(self, elapsed_seconds: float) -> float | None:
        """Seconds to wait before the next start after infrastructure failures in a row (5 s doubling, capped),
        None to start now. The deadline is kept in the history (in the job's elapsed time), so a restarted
        executor keeps it."""
        streak = stop.infra_streak(self.history)
        if not streak:
            self.history.backoff = None
            return None
        backoff = self.history.backoff
        if backoff is None or backoff.trial != streak[0].index:
            delay = stop.backoff_seconds(len(streak))
            backoff = self.history.backoff = Backoff(trial=streak[0].index, until=elapsed_seconds + delay)
            logger.info("%s: %d trial(s) in a row failed (%s); the next starts in %gs", self.history.job,
                        len(streak), streak[0].reason, delay)
        left = backoff.until - elapsed_seconds
        return left if left > 0 else None

    def _maybe_timeout(self, elapsed_seconds: float, running: set[str] | frozenset[str]) -> Decision | None:
        reason = self.rules.hard_stop(self.history, elapsed_seconds)
        if reason is None:
            return None
        message = ("stopped: the tuning ran out of its wall-clock limit (spec.tuning.timeoutSeconds)"
                   if reason == stop.TIMEOUT else f"stopped: {reason}")
        if reason == stop.REPEATED_FAILURES:
            self.history.message = stop.describe_repeated(stop.failure_streak(self.history))
            message = f"stopped: {reason}: {self.history.message}"
        for record in self.history.pending():
            self.fail(record.index, reason if reason == stop.TIMEOUT else stop.ABANDONED, message)
        if UnitKind.CONFIRM in running:
            self.history.confirmation = Confirmation(status=FAILED, reason=reason, message=message)
        if not self.ready:
            self.history.message = f"{message}, before the baseline finished"
        return self._finish(reason, cancel=sorted(running))

    def _finish(self, reason: str, cancel: list[str] | None = None) -> Decision:
        self.history.stop_reason = reason
        self.history.stop_clock(self.clock())
        self.history.outcome = self.outcome(reason)
        logger.info("%s: search stopped (%s); outcome %s", self.history.job, reason, self.history.outcome)
        return Decision(cancel=cancel or [], finished=reason)

    # --- proposals --------------------------------------------------------------------------
    def start_trials(self, slots: int) -> list[TrialRecord]:
        """Add up to `slots` pending trials (fewer when the strategy waits or the budget is spent)."""
        if not self.ready:
            return []
        k = min(slots, self.rules.budget(self.history))
        if k <= 0:
            return []
        assert self.space is not None
        configs = self.strategy.propose(self.space, self.history, k)[:k]
        now = self.clock()
        records = []
        for config in configs:
            if self.history.find(config) is not None:
                continue  # a strategy must never repeat a config; refuse rather than run it twice
            record = self.history.add(config, proposed_by=self.strategy.name)
            record.full_evaluation = self.strategy.needs_full_evaluation(self.space, self.history, config)
            record.started_at = now
            records.append(record)
        return records

    def finished_reason(self) -> str | None:
        """Why the search is over when nothing is pending and nothing new can start; else None."""
        if self.history.pending() or self.space is None:
            return None
        if self.goal_reached():
            return stop.GOAL_REACHED
        if self.rules.budget(self.history) <= 0:
            return stop.MAX_TRIALS
        if not self.strategy.propose(self.space, self.history, 1):
            return stop.SEARCH_EXHAUSTED
        return None

    def goal_reached(self) -> bool:
        """The strategy is done AND its best passing config is a success (fast enough for latency)."""
        assert self.space is not None
        if not self.strategy.goal_reached(self.space, self.history):
            return False
        return self.success(self.best())

    # --- the final confirmation -----------------------------------------------------------
    def confirm_candidates(self) -> list[TrialRecord]:
        """What the confirmation re-measures: the current winner by the figures so far, then the highest
        speedups (point estimates), `confirmCandidates` in all. The fastest in its own measurement is
        always among them, whatever its interval or op count."""
        passing = [t for t in self.history.trials if t.ok and t.passed and t.speed_at(self.batch_size)]
        if not passing:
            return []
        winner = rank_by_speed(self.history, passing, self.batch_size, self.criterion)[0]

        def point(record: TrialRecord) -> float:
            measured = speed_of(self.history, record, self.batch_size)
            return measured.speedup if measured is not None else 0.0

        fastest = sorted(passing, key=lambda t: (-point(t), t.config_key))
        return [winner, *(t for t in fastest if t is not winner)][: self.spec.tuning.confirm_candidates]

    def confirmation_unit(self) -> WorkUnit | None:
        """The confirm unit to run before the job ends; None when not wanted or already done (a new
        one runs only when trials recorded after the last confirmation passed)."""
        if self.spec.tuning.objective != "latency" or self.spec.tuning.confirm_candidates <= 0:
            return None
        previous = self.history.confirmation
        if previous is not None:
            seen = previous.trials_seen if previous.trials_seen is not None else len(self.history.trials)
            newer = [t for t in self.history.trials[seen:] if t.ok and t.passed and t.speed]
            if not newer:
                return None
        candidates = self.confirm_candidates()
        if not candidates:
            return None
        return WorkUnit(UnitKind.CONFIRM.value, UnitKind.CONFIRM, candidates=tuple(t.index for t in candidates),
                        candidate_configs={str(t.index): t.tune_config for t in candidates})

    # --- results -----------------------------------------------------------------------------
    def record(self, unit_id: str, result: BaselineResult | TrialResult | ConfirmResult,
               space: TuningSpace | None = None) -> TrialRecord | None:
        """Record a unit's typed result (dispatch on the unit id)."""
        if unit_id == UnitKind.BASELINE:
            assert isinstance(result, BaselineResult)
            self.record_baseline(result, space)
            return None
        if unit_id == UnitKind.CONFIRM:
            assert isinstance(result, ConfirmResult)
            self.record_confirm(result)
            return None
        assert isinstance(result, TrialResult)
        return self.record_trial(result)

    def record_baseline(self, result: BaselineResult, space: TuningSpace | None) -> None:
        if result.status != SUCCEEDED or result.accuracy is None or space is None:
            self.record_unit_failure(UnitKind.BASELINE, result.reason or stop.BASELINE_FAILED,
                                     result.message or "the baseline step did not produce the tuning space")
            return
        self.history.baseline = Baseline(
            accuracy=float(result.accuracy), latency_ms=dict(result.latency_ms),
            latency_p90_ms=dict(result.latency_p90_ms), model_size_bytes=int(result.model_size_bytes),
            seconds=float(result.seconds), metric=result.metric, peak_rss_bytes=dict(result.peak_rss_bytes),
            space_sha256=result.space_sha256,
        )
        self.space = space

    def record_trial(self, result: TrialResult) -> TrialRecord | None:
        """Record a trial's result once; a repeated or unknown result is ignored (returns None)."""
        record = next((t for t in self.history.trials if t.index == result.trial), None)
        if record is None or record.done:
            return None
        if result.config_key and result.config_key != record.config_key:
            logger.warning("trial %d: result for another config (%s) ignored", record.index, result.config_key)
            return None
        for name in COPIED_RESULT_FIELDS:  # a figure the result and the record both name is copied as it is
            value = getattr(result, name)
            setattr(record, name, copy.copy(value) if isinstance(value, dict | list) else value)
        record.status = SUCCEEDED if result.status == SUCCEEDED else FAILED
        baseline = self.history.baseline.accuracy if self.history.baseline else None
        record.passed = bool(record.ok and baseline is not None and self.criterion.passes(record.accuracy, baseline))
        record.finished_at = self.clock()
        return record

    def record_confirm(self, result: ConfirmResult) -> None:
        if result.status != SUCCEEDED:
            self.record_unit_failure(UnitKind.CONFIRM, result.reason or "Crashed", result.message or "")
            return
        self.history.confirmation = Confirmation(**dict(result), trials_seen=len(self.history.trials))

    def record_unit_failure(self, unit_id: str, reason: str, message: str) -> TrialRecord | None:
        """A unit that produced no result (crash, OOMKilled, Timeout, pod lost ...)."""
        if unit_id == UnitKind.BASELINE:
            self.history.message = message
            self._finish(stop.BASELINE_FAILED)
            return None
        if unit_id == UnitKind.CONFIRM:
            logger.warning("the confirmation failed (%s: %s); the in-trial figures decide", reason, message)
            self.history.confirmation = Confirmation(status=FAILED, reason=reason, message=message,
                                                     trials_seen=len(self.history.trials))
            return None
        index = trial_of(unit_id)
        return self.fail(index, reason, message) if index is not None else None

    def fail(self, index: int, reason: str, message: str) -> TrialRecord | None:
        return self.record_trial(TrialResult(trial=index, status=FAILED, reason=reason, message=message))

    # --- the verdict -------------------------------------------------------------------------
    def best(self) -> TrialRecord | None:
        return select_best(self.history, self.spec.tuning.objective, self.spec.tuning.objective_tolerance,
                           self.batch_size, self.criterion)

    def best_speed(self) -> SpeedMeasurement | None:
        """The ONE speed figure of the winner that every surface prints (confirmation first)."""
        best = self.best()
        return speed_of(self.history, best, self.batch_size) if best is not None else None

    def success(self, best: TrialRecord | None) -> bool:
        """A passing config that, for the latency objective, is faster than minSpeedup beyond doubt."""
        if best is None:
            return False
        if self.spec.tuning.objective != "latency":
            return True
        measured = speed_of(self.history, best, self.batch_size)
        return measured is not None and measured.above(self.spec.tuning.min_speedup)

    def outcome(self, stop_reason: str | None = None) -> str:
        """The job's final reason: the stop reason when the winner is a success, else why not."""
        reason = stop_reason or self.history.stop_reason or stop.SEARCH_EXHAUSTED
        if reason == stop.REPEATED_FAILURES:
            return reason  # a failure whatever was found before: the cause needs fixing (the best is still reported)
        if reason == stop.BASELINE_FAILED or self.history.baseline is None:
            return stop.BASELINE_FAILED if reason == stop.BASELINE_FAILED else reason
        best = self.best()
        if best is None:
            return stop.NO_CONFIG
        if not self.success(best):
            return stop.NO_SPEEDUP
        return reason

    def verdict(self) -> str:
        """One line a person reads: the outcome and why."""
        outcome = self.outcome()
        best = self.best()
        measured = self.best_speed()
        if outcome == stop.BASELINE_FAILED:
            return f"{outcome}: {self.history.message or 'the fp32 baseline failed'}"
        if outcome == stop.REPEATED_FAILURES:
            text = f"{outcome}: {self.history.message or 'trials in a row failed alike'}"
            if best is None or self.history.baseline is None:
                return text
            speed = f", speedup {measured.describe()}" if measured is not None else ""
            return f"{text}. Best passing config so far: trial {best.index}, accuracy {best.accuracy:.4f}{speed}"
        if best is None:
            return f"{outcome}: no configuration meets the accuracy criterion ({self.criterion.describe()})"
        head = f"trial {best.index}, accuracy {best.accuracy:.4f}"
        if self.spec.tuning.objective == "size":
            return f"{outcome}: {head}, {best.model_size_bytes} bytes"
        if measured is None:
            return f"{outcome}: {head}; its speed was not measured"
        if outcome == stop.NO_SPEEDUP:
            bar = ("fp32" if self.spec.tuning.min_speedup == 1.0
                   else f"{self.spec.tuning.min_speedup:g}× fp32 (spec.tuning.minSpeedup)")
            return (f"{outcome}: configs meet the accuracy criterion but none is faster than {bar} beyond "
                    f"measurement doubt; the best of them: {head}, speedup {measured.describe()}")
        return f"{outcome}: {head}, speedup {measured.describe()}"
