"""The tuning loop's decisions, shared by the local executor and the operator.

A session wraps (spec, space, baseline, history) and answers: which trials to start now, how to
record a result, whether to stop and why, and which trial is best. It holds no other state, so
either executor can rebuild it from the stored history at any time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from qtune.spec.models import JobSpec
from qtune.tuning import stop
from qtune.tuning.criterion import Criterion
from qtune.tuning.history import FAILED, SUCCEEDED, Baseline, History, TrialRecord
from qtune.tuning.objective import select_best
from qtune.tuning.space import TuningSpace
from qtune.tuning.strategies import create_strategy

logger = logging.getLogger(__name__)

RESULT_FIELDS = ("accuracy", "latency_ms", "latency_p90_ms", "fp32_latency_ms", "model_size_bytes", "timings",
                 "model_path", "reason", "message")


def objective_batch_size(spec: JobSpec) -> int:
    """Latency objective: the largest benchmarked batch size (where int8 pays most)."""
    return max(spec.benchmark.batch_sizes)


@dataclass
class TuningSession:
    spec: JobSpec
    space: TuningSpace
    baseline: Baseline
    history: History

    def __post_init__(self) -> None:
        self.criterion = Criterion.from_spec(self.spec.tuning.accuracy_criterion)
        self.strategy = create_strategy(self.spec.tuning.strategy, self.spec.tuning.seed)
        tuning = self.spec.tuning
        self.rules = stop.StopRules(tuning.max_trials, tuning.max_failed_trials, float(tuning.timeout_seconds))

    # --- proposals --------------------------------------------------------------------------
    def start_trials(self, slots: int) -> list[TrialRecord]:
        """Add up to `slots` pending trials (fewer when the strategy waits or the budget is spent)."""
        k = min(slots, self.rules.budget(self.history))
        if k <= 0:
            return []
        configs = self.strategy.propose(self.space, self.history, k)[:k]
        now = time.time()
        records = []
        for config in configs:
            record = self.history.add(config, proposed_by=self.strategy.name)
            record.started_at = now
            records.append(record)
        return records

    # --- results ------------------------------------------------------------------------------
    def record_result(self, index: int, result: dict[str, Any]) -> TrialRecord:
        record = next(t for t in self.history.trials if t.index == index)
        for name in RESULT_FIELDS:
            if result.get(name) is not None:
                setattr(record, name, result[name])
        record.status = SUCCEEDED if result.get("status") == SUCCEEDED else FAILED
        record.passed = record.ok and self.criterion.passes(record.accuracy, self.baseline.accuracy)
        record.finished_at = time.time()
        return record

    def fail(self, index: int, reason: str, message: str) -> TrialRecord:
        return self.record_result(index, {"status": FAILED, "reason": reason, "message": message})

    # --- stopping -----------------------------------------------------------------------------
    def hard_stop(self, elapsed_seconds: float) -> str | None:
        return self.rules.hard_stop(self.history, elapsed_seconds)

    def finished_reason(self) -> str | None:
        """Why the search is over when nothing is pending and nothing new can start; else None."""
        if self.history.pending():
            return None
        if self.strategy.goal_reached(self.space, self.history):
            return stop.GOAL_REACHED
        if self.rules.budget(self.history) <= 0:
            return stop.MAX_TRIALS
        if not self.strategy.propose(self.space, self.history, 1):
            return stop.SEARCH_EXHAUSTED
        return None

    def best(self) -> TrialRecord | None:
        return select_best(self.history, self.spec.tuning.objective, self.spec.tuning.objective_tolerance,
                           objective_batch_size(self.spec))

    def outcome(self, stop_reason: str) -> str:
        """Final condition reason: the stop reason, or NoConfigMeetsCriterion when nothing passed."""
        return stop_reason if self.best() is not None else stop.NO_CONFIG
