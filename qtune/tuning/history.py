"""Trial records and the job history: the only state a tuning run has.

Strategies are pure functions of (space, history), so the history alone lets a run resume after a
crash, and lets the operator pick up a job after a restart.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from qtune.protocol import FAILED, SUCCEEDED, SpeedMeasurement
from qtune.tuning.config import TuneConfig

T = TypeVar("T")

PENDING = "pending"
"""A trial started and not recorded yet; SUCCEEDED and FAILED come from the protocol."""


@dataclass
class Baseline:
    accuracy: float
    latency_ms: dict[str, float] = field(default_factory=dict)
    """p50 per batch size, keys are batch sizes as strings (JSON keys)."""
    latency_p90_ms: dict[str, float] = field(default_factory=dict)
    model_size_bytes: int = 0
    seconds: float = 0.0
    metric: str | None = None
    """The name of the metric `accuracy` is (top1, a user metric's name, ...)."""
    peak_rss_bytes: dict[str, int] = field(default_factory=dict)
    """Peak resident set of the baseline's process: "calibration" (while it calibrated), "total"."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Baseline:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class TrialRecord:
    index: int
    config_key: str
    tune_config: dict[str, Any]
    status: str = PENDING
    accuracy: float | None = None
    speed: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Batch size (str) -> SpeedMeasurement (protocol) as a dict: this model against fp32, measured
    interleaved in the trial's process. Empty when the trial was not benchmarked (it failed accuracy)."""
    model_size_bytes: int | None = None
    passed: bool | None = None
    reason: str | None = None
    """Why a trial failed: Crashed, Timeout, OOMKilled, MetricsUnavailable, ... plus a message."""
    message: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds: calibration, quantize, evaluate, benchmark, total."""
    peak_rss_bytes: dict[str, int] = field(default_factory=dict)
    """Peak resident set of the trial's process: "calibration" (while it calibrated, when it did), "total"."""
    model_path: str | None = None
    proposed_by: str | None = None
    full_evaluation: bool = False
    """Evaluate in full even when the criterion can no longer be met (the strategy ranks its score)."""
    notes: list[str] = field(default_factory=list)
    """What the trial said about itself (e.g. evaluation stopped early, not benchmarked)."""
    started_at: float | None = None
    finished_at: float | None = None

    def _parsed(self, name: str, source: Any, parse: Callable[[], T]) -> T:
        """`parse()` of `source`, once per record (ranking and status read it many times per step): the cache
        holds the object it was parsed from and is renewed when that field is replaced. Not a field: never
        serialized."""
        cached = self.__dict__.get(name)
        if cached is None or cached[0] is not source:
            cached = self.__dict__[name] = (source, parse())
        return cached[1]

    @property
    def config(self) -> TuneConfig:
        return self._parsed("_parsed_config", self.tune_config, lambda: TuneConfig.from_dict(self.tune_config))

    @property
    def done(self) -> bool:
        return self.status != PENDING

    @property
    def ok(self) -> bool:
        return self.status == SUCCEEDED

    def batch_key(self, batch_size: int | str | None = None) -> str | None:
        """The speed key of `batch_size`; by default the largest benchmarked batch."""
        if batch_size is not None:
            return str(batch_size)
        return max(self.speed, key=int) if self.speed else None

    def speed_at(self, batch_size: int | str | None = None) -> SpeedMeasurement | None:
        key = self.batch_key(batch_size)
        data = self.speed.get(key) if key is not None else None
        if not data:
            return None
        parsed: dict[str, SpeedMeasurement] = self._parsed("_parsed_speed", self.speed, dict)
        if key not in parsed:
            parsed[key] = SpeedMeasurement.model_validate(data)
        return parsed[key]

    def latency(self, batch_size: int | str | None = None) -> float | None:
        """This model's p50 in ms, from its speed measurement."""
        measured = self.speed_at(batch_size)
        return measured.p50_ms if measured else None

    def speedup(self, batch_size: int | str | None = None) -> float | None:
        """fp32 p50 / this model's p50, both from the same interleaved measurement."""
        measured = self.speed_at(batch_size)
        return measured.speedup if measured else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialRecord:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class History:
    job: str
    baseline: Baseline | None = None
    trials: list[TrialRecord] = field(default_factory=list)
    stop_reason: str | None = None
    started_at: float | None = None
    """While the job's clock runs: when the stretch of tuning not yet counted in `elapsed_seconds` began (the
    run's start, its resume, or the last checkpoint); None while the clock is stopped (a finished job)."""
    elapsed_seconds: float = 0.0
    """Tuning wall time counted up to `started_at` (every earlier run and resume of the job included). Read
    the job's tuning time with `elapsed(now)`, never from this field alone."""
    confirmation: dict[str, Any] | None = None
    """The final re-measurement of the best candidates (ConfirmResult as a dict), once run."""
    outcome: str | None = None
    """The job's final reason (GoalReached, NoSpeedup, NoConfigMeetsCriterion, ...), set when it ends."""
    message: str | None = None
    """Why the job failed as a whole (e.g. the baseline's error), when it did."""
    backoff: dict[str, Any] | None = None
    """After infrastructure failures: {"trial": the last failed trial, "until": elapsed seconds before which
    no unit starts} (see TuningSession.advance)."""

    # --- the job's clock: THE elapsed tuning time (stop rules, status, history.json, the console) -------
    def elapsed(self, now: float) -> float:
        """The job's tuning wall time at `now`: what was counted plus the running stretch."""
        running = max(0.0, now - self.started_at) if self.started_at is not None else 0.0
        return self.elapsed_seconds + running

    def start_clock(self, now: float) -> None:
        """The clock runs from `now` (no-op while it runs)."""
        if self.started_at is None:
            self.started_at = now

    def stop_clock(self, now: float) -> None:
        """The job is over: its elapsed time is final."""
        self.elapsed_seconds = self.elapsed(now)
        self.started_at = None

    def checkpoint(self, now: float) -> None:
        """Count the running stretch up to `now` (before a save: the stored `elapsed_seconds` is current)."""
        if self.started_at is not None:
            self.elapsed_seconds = self.elapsed(now)
            self.started_at = now

    def keys(self) -> set[str]:
        return {t.config_key for t in self.trials}

    def find(self, config: TuneConfig) -> TrialRecord | None:
        key = config.key()
        return next((t for t in self.trials if t.config_key == key), None)

    def finished(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.done]

    def pending(self) -> list[TrialRecord]:
        return [t for t in self.trials if not t.done]

    def failed(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.status == FAILED]

    def next_index(self) -> int:
        return max((t.index for t in self.trials), default=-1) + 1

    def add(self, config: TuneConfig, proposed_by: str | None = None) -> TrialRecord:
        record = TrialRecord(self.next_index(), config.key(), config.to_dict(), proposed_by=proposed_by)
        self.trials.append(record)
        return record

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "baseline": asdict(self.baseline) if self.baseline else None,
            "trials": [t.to_dict() for t in self.trials],
            "stop_reason": self.stop_reason,
            "started_at": self.started_at,
            "elapsed_seconds": self.elapsed_seconds,
            "confirmation": self.confirmation,
            "outcome": self.outcome,
            "message": self.message,
            "backoff": self.backoff,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        baseline = data.get("baseline")
        return cls(
            job=data["job"],
            baseline=Baseline.from_dict(baseline) if baseline else None,
            trials=[TrialRecord.from_dict(t) for t in data.get("trials", [])],
            stop_reason=data.get("stop_reason"),
            started_at=data.get("started_at"),
            elapsed_seconds=float(data.get("elapsed_seconds", 0.0)),
            confirmation=data.get("confirmation"),
            outcome=data.get("outcome"),
            message=data.get("message"),
            backoff=data.get("backoff"),
        )

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> History:
        return cls.from_dict(json.loads(Path(path).read_text()))


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers never see a half-written file (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
