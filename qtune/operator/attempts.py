"""Attempts of a unit: each start of a unit is a new attempt, with its own pod, Secret and inputs names."""

from __future__ import annotations

from dataclasses import dataclass, field

from qtune.operator import builders
from qtune.tuning import codec
from qtune.tuning.session import WorkUnit


def plan_of(unit: WorkUnit, attempt: int) -> builders.UnitPlan:
    return builders.UnitPlan(unit=unit.id, attempt=attempt, trial=unit.trial,
                             tune_config=codec.dump(unit.tune_config) if unit.tune_config is not None else None,
                             candidates=tuple(unit.candidates),
                             candidate_configs={k: codec.dump(v) for k, v in unit.candidate_configs.items()},
                             full_evaluation=unit.full_evaluation)


@dataclass
class Attempts:
    """Which start of each unit is the current one (names and Secrets are per attempt)."""

    latest: dict[str, int] = field(default_factory=dict)
    """unit -> the highest attempt started or seen (a new start takes the next one)."""
    expected: dict[str, tuple[int, float]] = field(default_factory=dict)
    """unit -> (attempt, when) of pods this process created that the pod index has not shown yet."""
    retired: set[str] = field(default_factory=set)
    """uids of failed pods whose failure was put aside (a failed baseline run again after an edit)."""

    def seen(self, unit: str, attempt: int) -> None:
        self.latest[unit] = max(self.latest.get(unit, -1), attempt)

    def next(self, unit: str, issued: int = -1) -> int:
        """The next attempt of `unit`: above every one seen here and `issued` (the highest whose secret the history
        says was issued: a restarted operator, which sees only the pods still there, never issues one twice)."""
        attempt = self.latest[unit] = max(self.latest.get(unit, -1), issued) + 1
        return attempt
