"""Trial records and the job history: the only state a tuning run has.

Strategies are pure functions of (space, history), so the history alone lets a run resume after a
crash, and lets the operator pick up a job after a restart. Typed values throughout; history.json is
`codec.dump(history)` and loads with `codec.load(History, ...)` (`save`/`load`).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtune.protocol import BOUND_WORDS, EARLY_STOP_NOTE, FAILED, SUCCEEDED, ConfirmResult, SpeedMeasurement
from qtune.tuning import codec
from qtune.tuning.config import TuneConfig

PENDING = "pending"
"""A trial started and not recorded yet; SUCCEEDED and FAILED come from the protocol."""
DECODE_KEY = "decode"
"""The speed key of a language model's time per new token (spec.benchmark.decode, qtune.runner.decode_speed);
"prefill" is its prompt's. Other keys are batch sizes."""


def speed_key_text(key: int | str) -> str:
    """A speed key as surfaces name it: "batch 32", "decode (per new token, batch 1)", "prefill (the prompt)"."""
    text = str(key)
    if text.isdigit():
        return f"batch {text}"
    return {DECODE_KEY: "decode (per new token, batch 1)", "prefill": "prefill (the prompt, batch 1)"}.get(text, text)


def default_speed_key(keys: Any) -> str | None:
    """The figure a latency objective decides on among speed keys: decode when measured, else the largest batch."""
    keys = [str(key) for key in keys]
    if DECODE_KEY in keys:
        return DECODE_KEY
    sizes = [key for key in keys if key.isdigit()]
    return max(sizes, key=int) if sizes else None


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
    space_sha256: str | None = None
    """On a cluster: sha256 of the tuning space as the baseline pod published it (its signed result named it);
    a restarted operator decodes the published space only when it still has this hash."""


@dataclass
class TrialRecord:
    index: int
    config_key: str
    tune_config: TuneConfig
    status: str = PENDING
    accuracy: float | None = None
    speed: dict[str, SpeedMeasurement] = field(default_factory=dict)
    """Batch size (str) -> this model against fp32, measured interleaved in the trial's process. Empty when
    the trial was not benchmarked (it failed accuracy)."""
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
    model_sha256: str | None = None
    """sha256 of the saved model as the trial's process measured it (None: no model saved)."""

    @property
    def done(self) -> bool:
        return self.status != PENDING

    def accuracy_text(self, digits: int = 4) -> str:
        """The accuracy as a trial line or table shows it: "≤ 0.9784" (≥ for lower-is-better metrics) when it is
        the bound an evaluation stopped early at (protocol.EARLY_STOP_NOTE), not a measured score."""
        if self.accuracy is None:
            return "–"
        value = f"{self.accuracy:.{digits}f}"
        note = next((n for n in self.notes if n.startswith(EARLY_STOP_NOTE)), None)
        if note is None:
            return value
        return ("≥ " if BOUND_WORDS[False] in note else "≤ ") + value

    @property
    def ok(self) -> bool:
        return self.status == SUCCEEDED

    def batch_key(self, batch_size: int | str | None = None) -> str | None:
        """The speed key of `batch_size`; by default decode when measured, else the largest benchmarked batch."""
        if batch_size is not None:
            return str(batch_size)
        return default_speed_key(self.speed)

    def speed_at(self, batch_size: int | str | None = None) -> SpeedMeasurement | None:
        key = self.batch_key(batch_size)
        return self.speed.get(key) if key is not None else None

    def latency(self, batch_size: int | str | None = None) -> float | None:
        """This model's p50 in ms, from its speed measurement."""
        measured = self.speed_at(batch_size)
        return measured.p50_ms if measured else None

    def speedup(self, batch_size: int | str | None = None) -> float | None:
        """fp32 p50 / this model's p50, both from the same interleaved measurement."""
        measured = self.speed_at(batch_size)
        return measured.speedup if measured else None


class Confirmation(ConfirmResult):
    """The final re-measurement as the history keeps it: the unit's result and how many trials the history
    held when it was recorded (a later passing trial calls for a new one)."""

    trials_seen: int | None = None
    """None: as many as the history holds (a confirmation stopped by the job's timeout)."""


@dataclass
class Backoff:
    """After infrastructure failures in a row: no unit starts before `until` (the job's elapsed seconds); the
    streak is the one that began with trial `trial` (see TuningSession.advance)."""

    trial: int
    until: float


@dataclass
class QueueStop:
    """A unit pod the cluster's batch queue (Kueue) preempted or evicted: not a failure, the unit ran again."""

    unit: str
    why: str
    """The queue's reason and message (the pod's TerminationTarget condition)."""


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
    confirmation: Confirmation | None = None
    """The final re-measurement of the best candidates, once run."""
    outcome: str | None = None
    """The job's final reason (GoalReached, NoSpeedup, NoConfigMeetsCriterion, ...), set when it ends."""
    message: str | None = None
    """Why the job failed as a whole (e.g. the baseline's error), when it did."""
    backoff: Backoff | None = None
    """After infrastructure failures: when the next unit may start (see TuningSession.advance)."""
    pinned: dict[str, str] = field(default_factory=dict)
    """Cluster: what a job's pods were first created with (spec field -> value, "" for the operator's default:
    image, workspace claim, ServiceAccount); a spec asking for another value later is refused
    (qtune/operator/admission.py). Empty for local runs."""
    attempts: dict[str, int] = field(default_factory=dict)
    """On a cluster: unit id -> the highest attempt whose result secret the operator issued, stored BEFORE the
    unit's Secret is created, so a restarted operator never issues the same (unit, attempt) secret again."""
    queue_stops: dict[str, QueueStop] = field(default_factory=dict)
    """On a cluster: pod name -> why Kueue stopped that unit pod, in the order seen, so that the count in the
    job's status and the one Event per stop survive an operator restart (qtune/operator/queueing.py)."""
    sequence: int = 0
    """On a cluster: how many times the operator stored this history (each store raises it), recorded in the job's
    status too (`status.history.sequence`, which tenants cannot write): a stored history older than that is refused
    (qtune/operator/store.py). 0 for local runs and for histories stored before it existed."""

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
        record = TrialRecord(self.next_index(), config.key(), config, proposed_by=proposed_by)
        self.trials.append(record)
        return record

    def save(self, path: Path) -> None:
        write_json_atomic(path, codec.dump(self))

    @classmethod
    def load(cls, path: Path) -> History:
        return codec.load(cls, json.loads(Path(path).read_text()))


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
