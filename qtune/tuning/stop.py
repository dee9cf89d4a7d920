"""Stop rules and outcomes. Reasons double as the operator's condition reasons."""

from __future__ import annotations

from dataclasses import dataclass

from qtune.tuning.history import History

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

SUCCESS_OUTCOMES = frozenset({GOAL_REACHED, SEARCH_EXHAUSTED, MAX_TRIALS, TIMEOUT, TOO_MANY_FAILURES})
"""Outcomes with a winner that meets the criterion (and, for latency, is faster than fp32)."""


@dataclass(frozen=True)
class StopRules:
    max_trials: int
    max_failed_trials: int | None
    timeout_seconds: float

    def budget(self, history: History) -> int:
        """How many more trials may be started."""
        return max(0, self.max_trials - len(history.trials))

    def hard_stop(self, history: History, elapsed_seconds: float) -> str | None:
        """A reason to stop now, abandoning running work; None to go on."""
        if self.timeout_seconds and elapsed_seconds >= self.timeout_seconds:
            return TIMEOUT
        if self.max_failed_trials is not None and len(history.failed()) >= self.max_failed_trials:
            return TOO_MANY_FAILURES
        return None
