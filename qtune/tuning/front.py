"""The accuracy–speed front: the configs a user can choose between without running anything again.

A config is on the front when no other config is at least as accurate and at least as fast, and
better in one of the two (Pareto dominance). Speed is the speedup over fp32 at the objective batch
size, the figure every surface prints for that trial (the final confirmation's when it re-measured
the trial, else the trial's own: `objective.speed_of`); accuracy counts in the criterion's direction.

Dominance compares the speedups' point estimates, not their intervals, because
- it is a strict order (transitive): every config left out is dominated by one that is listed, and
  the front does not depend on the order the trials ran in;
- its length does not grow with measurement noise: with "faster beyond measurement doubt" a busy
  machine's wide intervals would keep nearly every config on the front;
- the interval is printed beside every entry, and `clear_gain` says whether an entry is faster
  beyond doubt (disjoint intervals) than the next more accurate one, so a reader sees which steps
  of the front are real and which are within the noise.

Only trials that succeeded and were benchmarked at that batch size count. One that misses the
accuracy criterion stays on the front when it is measured and not dominated, marked `passed=False`
(a faster config at a small accuracy cost is exactly what a user may want to see); a trial the runner
did not benchmark (it missed the criterion) has no speed and is not on it, nor is one whose figure the
machine was too busy to trust (`SpeedMeasurement.trusted`: nothing is decided on it, and a front is a choice).

Pure Python (no numpy): the operator imports `qtune.tuning`. Surfaces format the entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qtune.protocol import SpeedMeasurement
from qtune.tuning.history import History, TrialRecord
from qtune.tuning.objective import confirmed_speed, speed_of

if TYPE_CHECKING:
    from qtune.tuning.session import TuningSession

__all__ = ["RULE", "FrontEntry", "accuracy_speed_front", "front_document", "front_window", "session_front",
           "speedup_text"]

RULE = ("on the front: no other measured config is at least as accurate and at least as fast (speedup point "
        "estimates at the objective batch size), and better in one; clear_gain: faster beyond measurement doubt "
        "than the next more accurate entry")


@dataclass(frozen=True)
class FrontEntry:
    """One config on the front, with the figures a user weighs (plain data, surfaces format it)."""

    trial: int
    accuracy: float
    passed: bool
    speed: SpeedMeasurement
    confirmed: bool
    """`speed` is the final confirmation's re-measurement, not the trial's own."""
    model_size_bytes: int | None
    fp32_ops: int
    config_key: str
    model_path: str | None
    clear_gain: bool | None
    """Faster beyond doubt than the next more accurate entry (disjoint intervals); None for the most accurate."""
    winner: bool = False

    @property
    def speedup(self) -> float:
        return self.speed.speedup

    def to_dict(self) -> dict[str, Any]:
        """history.json's form (snake_case, like the trial records it points to by `trial`)."""
        return {
            "trial": self.trial, "accuracy": self.accuracy, "passed": self.passed, "winner": self.winner,
            "speedup": self.speed.speedup, "low": self.speed.low, "high": self.speed.high,
            "confirmed": self.confirmed, "clear_gain": self.clear_gain, "model_size_bytes": self.model_size_bytes,
            "fp32_ops": self.fp32_ops, "config_key": self.config_key, "model_path": self.model_path,
            "speed": self.speed.model_dump(),
        }


def speedup_text(speedup: float, low: float, high: float) -> str:
    """A speedup with its interval as every surface prints it; one below fp32 beyond doubt says so (a speedup
    of 0.76× is no speed-up)."""
    text = f"{speedup:.2f}× [{low:.2f}–{high:.2f}]"
    return f"{text} (slower than fp32)" if high < 1.0 else text


def _measured(history: History, batch_size: int | str) -> list[tuple[TrialRecord, SpeedMeasurement]]:
    out = []
    for record in history.trials:
        if not record.ok or record.accuracy is None or not math.isfinite(record.accuracy):
            continue
        measured = speed_of(history, record, batch_size)
        if measured is not None and measured.trusted and math.isfinite(measured.speedup):
            out.append((record, measured))
    return out


def accuracy_speed_front(history: History, batch_size: int | str, higher_is_better: bool = True,
                         winner: int | None = None) -> list[FrontEntry]:
    """The front, most accurate first (so the speedup rises down the list); `winner` marks that trial."""
    sign = 1.0 if higher_is_better else -1.0
    measured = _measured(history, batch_size)
    # best accuracy first, then the fastest, then the trial number: one order whatever the history's order
    measured.sort(key=lambda pair: (-sign * float(pair[0].accuracy), -pair[1].speedup, pair[0].index))  # type: ignore[arg-type]
    front: list[tuple[TrialRecord, SpeedMeasurement]] = []
    fastest_more_accurate = -math.inf  # the best speedup among configs strictly more accurate
    group_accuracy: float | None = None
    group_fastest = -math.inf
    for record, speed in measured:
        accuracy = float(record.accuracy)  # type: ignore[arg-type]
        if accuracy != group_accuracy:  # a new (lower) accuracy: the previous group is now "more accurate"
            fastest_more_accurate = max(fastest_more_accurate, group_fastest)
            group_accuracy, group_fastest = accuracy, speed.speedup
        # dominated: an equally accurate config is faster (its group's first), or a more accurate one is as fast
        if speed.speedup == group_fastest and speed.speedup > fastest_more_accurate:
            front.append((record, speed))
    entries = []
    previous: SpeedMeasurement | None = None
    for record, speed in front:
        entries.append(FrontEntry(
            trial=record.index, accuracy=float(record.accuracy),  # type: ignore[arg-type]
            passed=bool(record.passed), speed=speed,
            confirmed=confirmed_speed(history, record.index, batch_size) is not None,
            model_size_bytes=record.model_size_bytes, fp32_ops=len(record.tune_config.fp32_ops()),
            config_key=record.config_key, model_path=record.model_path,
            clear_gain=None if previous is None else speed.low > previous.high,
            winner=winner is not None and record.index == winner))
        previous = speed
    return entries


def front_window(front: list[FrontEntry], limit: int) -> list[FrontEntry]:
    """At most `limit` consecutive entries around the winner (else the fastest passing entry, else the most
    accurate): the alternatives nearest to what the run chose, more accurate ones above, faster ones below."""
    if limit <= 0:
        return []
    if len(front) <= limit:
        return list(front)
    pivot = next((i for i, e in enumerate(front) if e.winner), None)
    if pivot is None:
        passing = [i for i, e in enumerate(front) if e.passed]
        pivot = passing[-1] if passing else 0
    start = min(max(0, pivot - (limit - 1) // 2), len(front) - limit)
    return front[start:start + limit]


def front_document(front: list[FrontEntry], batch_size: int | str) -> dict[str, Any]:
    """The front as history.json names it: the batch size, the rule, and the entries (`trial` is the index of
    a record in `trials`, which holds its whole tune config)."""
    key = int(batch_size) if str(batch_size).isdigit() else str(batch_size)  # a batch size, or decode
    return {"batch_size": key, "rule": RULE, "entries": [e.to_dict() for e in front]}


def session_front(session: TuningSession) -> list[FrontEntry]:
    """The front of a session's history, with its winner marked: the one call local and cluster surfaces make."""
    if session.history.baseline is None:
        return []
    best = session.best()
    return accuracy_speed_front(session.history, session.batch_size, session.criterion.higher_is_better,
                                best.index if best is not None else None)
