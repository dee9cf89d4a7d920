"""What the basic strategy expects of a config before it runs, and how far a failed config missed.

Speed: the op-time profile (`TuningSpace.op_gains`, else a prior by op type) gives each config a
*raw* expected speedup; the trials that were measured say how far off that estimate runs on this
model and machine (`calibration`: the median of measured / raw), and every expectation is scaled by
it. Estimates only order and filter candidates; measured speedups decide.

Accuracy: a failed trial evaluated in full (`TrialRecord.full_evaluation`) has an exact score, so
how far it missed the criterion is known; a trial whose evaluation stopped early reports only the
best score it could still have reached, which says nothing about the margin. Near misses are
therefore taken from fully evaluated trials only, which also keeps the search the same with and
without early stopping.

Pure functions of the space and the records (the strategy stays a function of space and history).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from qtune.tuning.config import TuneConfig
from qtune.tuning.criterion import Criterion
from qtune.tuning.history import TrialRecord
from qtune.tuning.space import TuningSpace
from qtune.tuning.speed import median

MIN_TIME = 0.05
"""An estimated time below 5% of fp32 (a 20× speedup) is not believed."""
PROMISE_MARGIN = 0.10
"""Once a passing config meets the goal, an untried config is worth a trial only when expected at least
this much faster than the fastest passing one (estimates are rough; a smaller edge would not survive
measurement). Before, any config expected to beat min_speedup is."""
NEAR_MISS_SHARE = 1.0
"""A failed config is a near miss when it missed the criterion's threshold by at most this share of the
allowed loss (e.g. relative 1% on 0.90: it scored at least 0.90 − 2 × 0.009)."""


def allowed_loss(criterion: Criterion, baseline: float) -> float:
    """The accuracy a config may lose against fp32 (in the metric's units, >= 0)."""
    return abs(baseline - criterion.threshold(baseline))


def loss(accuracy: float, baseline: float, criterion: Criterion) -> float:
    """How much worse than fp32 `accuracy` is (negative when better)."""
    return baseline - accuracy if criterion.higher_is_better else accuracy - baseline


def exact(record: TrialRecord) -> bool:
    """The record's accuracy is its real score (evaluated in full at the strategy's request)."""
    return record.ok and record.full_evaluation and record.accuracy is not None and record.accuracy == record.accuracy


def shortfall(record: TrialRecord, criterion: Criterion, baseline: float) -> float | None:
    """By how much an exactly scored config missed the threshold (0 when it passed); None when unknown."""
    if not exact(record):
        return None
    assert record.accuracy is not None
    return max(0.0, loss(record.accuracy, baseline, criterion) - allowed_loss(criterion, baseline))


def near_miss(record: TrialRecord, criterion: Criterion | None, baseline: float | None) -> bool:
    if criterion is None or baseline is None or record.passed or not exact(record):
        return False
    missed = shortfall(record, criterion, baseline)
    return missed is not None and missed <= NEAR_MISS_SHARE * max(allowed_loss(criterion, baseline), 1e-12)


def closeness(record: TrialRecord, criterion: Criterion | None, baseline: float | None) -> float | None:
    """allowed loss / the config's loss, at most 1 (1: it passed or lost nothing); None when unknown."""
    if criterion is None or baseline is None or not exact(record):
        return None
    assert record.accuracy is not None
    lost = loss(record.accuracy, baseline, criterion)
    allowed = allowed_loss(criterion, baseline)
    if lost <= allowed:
        return 1.0
    return allowed / lost if lost > 0 else 1.0


@dataclass
class Outlook:
    """Expected speed of configs, calibrated on the measured records given, and the bar a new config
    must clear to be worth a trial."""

    gains: dict[str, float]
    calibration: float
    best_measured: float | None
    """The highest measured speedup (point) of a passing record, if any."""
    min_speedup: float
    goal_met: bool = False
    """A passing record meets the goal: from then on only configs expected clearly faster are worth it."""

    @classmethod
    def of(cls, space: TuningSpace, records: Iterable[TrialRecord], batch_size: int | None,
           min_speedup: float = 1.0, goal_met: bool = False) -> Outlook:
        gains = space.op_gains()
        ratios: list[float] = []
        best: float | None = None
        for record in records:
            if not (record.ok and record.passed):
                continue
            measured = record.speed_at(batch_size)
            if measured is None or measured.speedup <= 0:
                continue
            raw = raw_speedup(gains, record.tune_config)
            ratios.append(measured.speedup / raw)
            best = measured.speedup if best is None else max(best, measured.speedup)
        calibration = min(10.0, max(0.1, median(ratios))) if ratios else 1.0
        return cls(gains, calibration, best, min_speedup, goal_met)

    def expected(self, config: TuneConfig) -> float:
        """Expected speedup of `config` over fp32."""
        return raw_speedup(self.gains, config) * self.calibration

    def gain(self, config: TuneConfig) -> float:
        """Expected fraction of the fp32 time saved (from the profile or the prior; uncalibrated)."""
        return sum(self.gains.get(name, 0.0) for name in config.quantized_ops())

    @property
    def bar(self) -> float:
        """The expected speedup an untried config needs to be worth a trial: while the goal is not met,
        min_speedup (any config that could meet it); once met, clearly more than the fastest passing."""
        if not self.goal_met or self.best_measured is None:
            return self.min_speedup
        return max(self.min_speedup, self.best_measured * (1.0 + PROMISE_MARGIN))

    def promising(self, config: TuneConfig) -> bool:
        return self.expected(config) > self.bar


def raw_speedup(gains: dict[str, float], config: TuneConfig) -> float:
    saved = sum(gains.get(name, 0.0) for name in config.quantized_ops())
    return 1.0 / max(MIN_TIME, 1.0 - saved)

