"""The winner as every surface shows it: one `BestSummary`, built once from the session.

`best_config.json` (qtune/local/driver.py) and the operator's `status.best` (qtune/operator/status.py)
render the same summary (each with its own field names: snake_case in the file, camelCase in the
status), so both show the same trial, accuracy, sizes, tune config and ONE speed figure (the
confirmation's when it re-measured the winner, else the trial's own: `TuningSession.best_speed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qtune.protocol import SpeedMeasurement
from qtune.tuning.config import TuneConfig
from qtune.tuning.history import Baseline, TrialRecord
from qtune.tuning.objective import confirmed_speed

if TYPE_CHECKING:
    from qtune.tuning.session import TuningSession

CONFIRMED_SOURCE = "confirmation: re-measured against fp32 and the other best candidates in one interleaved session"
TRIAL_SOURCE = "the trial: fp32 and int8 measured interleaved in the trial's process"


@dataclass(frozen=True)
class BestSummary:
    """The winner of a job (so far), its ONE speed figure and what it is compared with."""

    trial: int
    config_key: str
    tune_config: TuneConfig
    accuracy: float | None
    speed: SpeedMeasurement | None
    """The figure every surface prints for the winner (None: not measured, e.g. objective size)."""
    confirmed: bool
    """`speed` is the final confirmation's re-measurement, not the trial's own."""
    model_size_bytes: int | None
    model_path: str | None
    outcome: str
    verdict: str
    baseline_accuracy: float | None = None
    metric: str | None = None
    baseline_model_size_bytes: int | None = None
    fp32_alone_latency_ms: dict[str, float] = field(default_factory=dict)
    """fp32 alone (the baseline's own benchmark): shown as such, never divided by the winner's latency."""

    @property
    def fp32_ops(self) -> list[str]:
        return self.tune_config.fp32_ops()

    @property
    def speed_source(self) -> str:
        return CONFIRMED_SOURCE if self.speed is not None and self.confirmed else TRIAL_SOURCE

    @property
    def size_ratio(self) -> float | None:
        """fp32 size / int8 size, when both are known."""
        if self.baseline_model_size_bytes and self.model_size_bytes:
            return self.baseline_model_size_bytes / self.model_size_bytes
        return None


def best_summary(session: TuningSession) -> BestSummary | None:
    """The session's winner as a summary; None while nothing passes."""
    best = session.best()
    if best is None:
        return None
    return summarize(best, session.history.baseline, session.best_speed(),
                     confirmed_speed(session.history, best.index, session.batch_size) is not None,
                     session.outcome(), session.verdict())


def summarize(best: TrialRecord, baseline: Baseline | None, speed: SpeedMeasurement | None, confirmed: bool,
              outcome: str = "", verdict: str = "") -> BestSummary:
    """The summary of `best` with `speed` its one figure (`best_summary` passes the session's)."""
    return BestSummary(
        trial=best.index, config_key=best.config_key, tune_config=best.tune_config, accuracy=best.accuracy,
        speed=speed, confirmed=confirmed, model_size_bytes=best.model_size_bytes, model_path=best.model_path,
        outcome=outcome, verdict=verdict,
        baseline_accuracy=baseline.accuracy if baseline is not None else None,
        metric=baseline.metric if baseline is not None else None,
        baseline_model_size_bytes=baseline.model_size_bytes if baseline is not None else None,
        fp32_alone_latency_ms=dict(baseline.latency_ms) if baseline is not None else {})
