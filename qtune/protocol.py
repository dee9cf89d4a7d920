"""The one protocol between runner, local executor and operator: typed results and their encodings.

Everything that crosses a process boundary is defined here once: the result of a unit of work
(baseline, trial, confirmation), the exit codes and termination message of the runner, and the
signature that proves a cluster result came from the pod that was given the trial's secret.
The encodings that know no message (canonical JSON and HMAC, termination message, ConfigMap
payloads, the metric table's `Sample`) are in `qtune.wire` and re-exported here.
This module imports no framework (the operator imports it).
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Re-exported: the unit vocabulary lives in qtune.units.
from qtune.units import (  # noqa: F401
    JOBS_FOLDER,
    LONG_UNIT_FACTOR,
    LONG_UNIT_FLOOR_SECONDS,
    TRIAL_PREFIX,
    UnitKind,
    is_job_folder,
    job_folder,
    trial_unit,
    unit_kind,
    unit_timeout_seconds,
    unit_trial_index,
)

# Re-exported: the message-free encodings live in qtune.wire, and `from qtune.protocol import X` keeps working.
from qtune.wire import (  # noqa: F401
    CONFIGMAP_LIMIT,
    INFLATED_LIMIT,
    INVALID_SPEC,
    PLAIN_LIMIT,
    RATIO_LIMIT,
    RESULT_TAG,
    TERMINATION_LIMIT,
    GroupKey,
    PayloadTooLarge,
    ProtocolError,
    Sample,
    canonical_bytes,
    decode_document,
    derive_unit_secret,
    encode_document,
    gateway_operator_token,
    group_series,
    pack_termination,
    parse_termination,
    push_authorization,
    push_token,
    sign,
    sign_stored,
    stored_value,
    structural_count,
    termination_message,
    unpack_termination,
    value_sha256,
    verify,
    verify_stored,
)

EXIT_OK = 0
EXIT_JOB_UNUSABLE = 1
"""The job itself cannot run (bad spec, model or data): terminal, the message says why."""
EXIT_TRIAL_FAILED = 2
"""The trial ran and failed (its result says why): recorded, the search goes on."""

SUCCEEDED, FAILED = "succeeded", "failed"


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)


class SpeedMeasurement(_Message):
    """A model's latency against fp32 at one batch size, measured interleaved in ONE process.

    `p50_ms`/`fp32_p50_ms` are medians over every run of every window of this measurement, so
    `speedup == fp32_p50_ms / p50_ms` exactly; [`low`, `high`] is its confidence interval
    (bootstrap over the paired rounds). Load that comes and goes widens the interval; contention for
    the measurement's own CPUs is detected window by window and said in the fields from
    `contended_rounds` on (qtune.runner.contention, docs/speed.md)."""

    batch_size: int
    p50_ms: float
    p90_ms: float
    fp32_p50_ms: float
    fp32_p90_ms: float
    speedup: float
    low: float
    high: float
    confidence: float = 0.95
    rounds: int = 0
    runs_per_window: int = 0
    threads: int = 0
    seconds: float = 0.0
    cpu_clock: bool = False
    """True: each run was timed by the thread's CPU time (one thread: the whole inference runs on it),
    which leaves out the time the OS gave other processes; False: wall-clock time."""
    contended_rounds: int = 0
    """Rounds in which this process waited for a CPU (qtune.runner.contention): left out of the figure
    when timed by the wall clock (`rounds` counts the others), kept when timed by CPU time."""
    busy: bool = False
    """The machine stayed busy while measuring (at least half the rounds contended, or too few clean)."""
    requested_threads: int = 0
    """Set when the machine was too busy to measure with the job's thread count: the count asked for,
    while this figure was measured with `threads` (one, timed by CPU time). 0: measured as asked."""
    trusted: bool = True
    """False: the machine was too busy for this figure and no unbiased way was taken; nothing is decided on it."""
    exclusive_cpus: bool | None = None
    """In a pod: whether its CPUs were its own (a cpuset of exactly its CPUs: Guaranteed QoS under the
    kubelet's static CPU manager policy). None: not known (e.g. a local run)."""

    def above(self, threshold: float) -> bool:
        """Faster than `threshold` (e.g. 1.0 = fp32) beyond doubt: the whole interval lies above it,
        and the figure is one to decide on (a busy machine's untrusted figure never is)."""
        return self.trusted and self.low > threshold

    def overlaps(self, other: SpeedMeasurement) -> bool:
        """The two speedups cannot be told apart."""
        return self.low <= other.high and other.low <= self.high

    def against_fp32(self) -> str:
        """The speedup in words that say slower when it is slower: "1.52× faster than fp32", "1.32× slower
        than fp32" (a speedup of 0.76×), or "as fast as fp32 within measurement doubt" (the interval holds 1)."""
        if self.low > 1.0:
            return f"{self.speedup:.2f}× faster than fp32"
        if self.high < 1.0:
            return f"{1.0 / self.speedup:.2f}× slower than fp32"
        return "as fast as fp32 within measurement doubt"

    def describe(self) -> str:
        caveat = self.caveat()
        words = "" if self.low > 1.0 else f"{self.against_fp32()}; "  # a speedup above 1 says "faster" itself
        return (f"{self.speedup:.2f}× [{self.low:.2f}–{self.high:.2f}] ({words}fp32 {self.fp32_p50_ms:.3f} ms → "
                f"{self.p50_ms:.3f} ms at batch {self.batch_size}; {self.rounds} interleaved rounds, "
                f"{self.clock_name} time, {self.threads} thread(s)" + (f"; {caveat}" if caveat else "") + ")")

    @property
    def clock_name(self) -> str:
        return "CPU" if self.cpu_clock else "wall"

    @property
    def fell_back(self) -> bool:
        """Measured with fewer threads than the job asked for because the machine was busy."""
        return self.requested_threads > self.threads

    def caveat(self) -> str | None:
        """What a reader must know about how busy the machine was, or None when it was quiet."""
        if not self.trusted:
            return (f"MACHINE TOO BUSY to measure this ({self.contended_rounds} rounds contended): "
                    "not a figure to decide on")
        if self.fell_back:
            return (f"machine busy: measured with {self.threads} thread by CPU time instead of "
                    f"{self.requested_threads} threads by wall time; the speedup with {self.requested_threads} "
                    "threads may differ")
        if self.contended_rounds and not self.cpu_clock:
            return f"{self.contended_rounds} contended rounds left out"
        if self.busy:
            return f"machine busy ({self.contended_rounds} rounds contended); CPU time is not biased by it"
        return None


class BaselineResult(_Message):
    """The fp32 model: accuracy on the evaluation set, standalone latency and size."""

    status: Literal["succeeded", "failed"] = SUCCEEDED
    accuracy: float | None = None
    metric: str | None = None
    latency_ms: dict[str, float] = Field(default_factory=dict)
    latency_p90_ms: dict[str, float] = Field(default_factory=dict)
    model_size_bytes: int = 0
    seconds: float = 0.0
    reason: str | None = None
    message: str | None = None
    peak_rss_bytes: dict[str, int] = Field(default_factory=dict)
    """Peak resident set of the unit's process: "calibration" (while it calibrated, when it did), "total"."""
    space_sha256: str | None = None
    """sha256 (hex, `value_sha256`) of the tuning space exactly as the pod stored it in its `<job>-baseline`
    ConfigMap (the JSON text, or the base64 of its gzip). Signed with the rest: the operator decodes the
    published space only once this result is accepted and the stored value has this hash."""


EARLY_STOP_NOTE = "evaluation stopped early"
"""How a trial's note begins when its evaluation stopped once the criterion was out of reach
(qtune/runner/evaluation.py): its accuracy is then the best score it could still have reached, a bound that fails
the criterion, not its measured score."""
BOUND_WORDS = {True: "at most", False: "at least"}
"""The note's words for that bound, by the metric's direction (higher is better: the score is at most the bound)."""


class TrialResult(_Message):
    """One trial's outcome. `speed` is empty when the trial was not benchmarked (it failed the
    accuracy criterion, so its latency would decide nothing)."""

    trial: int
    status: Literal["succeeded", "failed"] = FAILED
    config_key: str | None = None
    accuracy: float | None = None
    speed: dict[str, SpeedMeasurement] = Field(default_factory=dict)
    model_size_bytes: int | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    model_path: str | None = None
    reason: str | None = None
    message: str | None = None
    notes: list[str] = Field(default_factory=list)
    """What the trial says about itself; a note beginning EARLY_STOP_NOTE: `accuracy` is a bound, not a score."""
    peak_rss_bytes: dict[str, int] = Field(default_factory=dict)
    """Peak resident set of the trial's process: "calibration" (while it calibrated, when it did), "total"."""
    model_sha256: str | None = None
    """sha256 (hex) of the saved model file (of its files in name order for a model folder), when it was saved."""


class ConfirmResult(_Message):
    """The final re-measurement: the few best candidates against fp32 and each other, in one
    interleaved session (so the choice never rests on readings taken minutes apart)."""

    status: Literal["succeeded", "failed"] = SUCCEEDED
    candidates: list[int] = Field(default_factory=list)
    speed: dict[str, dict[str, SpeedMeasurement]] = Field(default_factory=dict)
    """trial index (str) -> batch size (str) -> measurement."""
    seconds: float = 0.0
    reason: str | None = None
    message: str | None = None


Result = BaselineResult | TrialResult | ConfirmResult


# --- result signatures (the canonical encoding and HMAC are qtune.wire's) -----------------------
def signed_payload(job_uid: str, unit: str, result: Result) -> dict[str, Any]:
    """What a result's signature covers: the whole result bound to its job and unit (a result of
    one unit cannot be replayed as another's)."""
    return {"job_uid": job_uid, "unit": unit, "kind": result_kind(result),
            "result": result.model_dump(mode="python")}


def sign_result(job_uid: str, unit: str, result: Result, secret: str) -> str:
    return sign(signed_payload(job_uid, unit, result), secret)


def verify_result(job_uid: str, unit: str, result: Result, secret: str, signature: str | None) -> bool:
    return verify(signed_payload(job_uid, unit, result), secret, signature)


def result_kind(result: Result) -> UnitKind:
    if isinstance(result, BaselineResult):
        return UnitKind.BASELINE
    if isinstance(result, ConfirmResult):
        return UnitKind.CONFIRM
    return UnitKind.TRIAL


RESULT_MODELS: dict[str, type[BaselineResult] | type[TrialResult] | type[ConfirmResult]] = {
    UnitKind.BASELINE: BaselineResult, UnitKind.TRIAL: TrialResult, UnitKind.CONFIRM: ConfirmResult}


# --- the metric table: results as Prometheus samples ------------------------------------------
# A result crosses the Pushgateway and Prometheus as the series below; every field of the three
# result models has a row (tests check it), numbers as sample values (Prometheus keeps float64
# exactly: Python's repr and Go's shortest formatting round-trip), strings and lists as labels of
# the one `qtune_result_info` series. A field that is None has no series.
METRIC_PREFIX = "qtune_result_"
INFO_METRIC = f"{METRIC_PREFIX}info"
PUSH_JOB = "qtune_result"
"""The Pushgateway `job` of every result group; the grouping key adds {job_uid, unit}."""
GROUP_LABELS = ("job_uid", "unit")  # exactly these beside `job`: a group with any other is not a result
SPEED_FIELDS = ("batch_size", "p50_ms", "p90_ms", "fp32_p50_ms", "fp32_p90_ms", "speedup", "low", "high",
                "confidence", "rounds", "runs_per_window", "threads", "seconds", "cpu_clock", "contended_rounds",
                "busy", "requested_threads", "trusted", "exclusive_cpus")
"""Every field of SpeedMeasurement, each one series `qtune_result_speed_<field>{batch_size}`."""

LABEL_FIELDS: dict[str, tuple[str, ...]] = {
    UnitKind.BASELINE: ("status", "metric", "reason", "message", "space_sha256"),
    UnitKind.TRIAL: ("status", "config_key", "model_path", "reason", "message", "notes", "model_sha256"),
    UnitKind.CONFIRM: ("status", "candidates", "reason", "message"),
}
"""String (and list, as JSON) fields: labels of the info series."""
SCALAR_FIELDS: dict[str, tuple[str, ...]] = {
    UnitKind.BASELINE: ("accuracy", "model_size_bytes", "seconds"),
    UnitKind.TRIAL: ("trial", "accuracy", "model_size_bytes"),
    UnitKind.CONFIRM: ("seconds",),
}
"""Numeric fields: one series `qtune_result_<field>` each."""
MAP_FIELDS: dict[str, dict[str, tuple[str, str]]] = {
    UnitKind.BASELINE: {"latency_ms": ("latency_ms", "batch_size"), "latency_p90_ms": ("latency_p90_ms", "batch_size"),
                        "peak_rss_bytes": ("peak_rss_bytes", "phase")},
    UnitKind.TRIAL: {"timings": ("duration_seconds", "phase"), "peak_rss_bytes": ("peak_rss_bytes", "phase")},
    UnitKind.CONFIRM: {},
}
"""dict[str, float] fields: field -> (metric suffix, key label)."""
SPEED_MAP_FIELDS: dict[str, tuple[str, ...]] = {UnitKind.BASELINE: (), UnitKind.TRIAL: ("speed",),
                                                 UnitKind.CONFIRM: ("speed",)}
"""Speed fields: TrialResult.speed {batch: SpeedMeasurement}; ConfirmResult.speed {trial: {batch: ...}}
(label `candidate` = the trial index)."""
SIGNATURE_LABEL = "signature"
KIND_LABEL = "kind"


def encode_result(result: Result, signature: str | None = None) -> list[Sample]:
    """The metric table of one result (plus its signature) as samples."""
    kind = result_kind(result)
    data = result.model_dump(mode="python")
    info: dict[str, str] = {KIND_LABEL: kind.value}
    for name in LABEL_FIELDS[kind]:
        value = data.get(name)
        if value is None:
            continue
        info[name] = json.dumps(value, separators=(",", ":")) if isinstance(value, list) else str(value)
    if signature:
        info[SIGNATURE_LABEL] = signature
    samples = [Sample(name=INFO_METRIC, labels=info, value=1.0)]
    for name in SCALAR_FIELDS[kind]:
        if data.get(name) is not None:
            samples.append(Sample(name=f"{METRIC_PREFIX}{name}", value=float(data[name])))
    for name, (suffix, label) in MAP_FIELDS[kind].items():
        for key, value in sorted((data.get(name) or {}).items()):
            samples.append(Sample(name=f"{METRIC_PREFIX}{suffix}", labels={label: str(key)}, value=float(value)))
    for name in SPEED_MAP_FIELDS[kind]:
        speed = data.get(name) or {}
        nested = speed.items() if kind == UnitKind.CONFIRM else [("", speed)]
        for candidate, by_batch in nested:
            for batch, measurement in sorted(by_batch.items()):
                labels = {"batch_size": str(batch)}
                if kind == UnitKind.CONFIRM:
                    labels["candidate"] = str(candidate)
                for field in SPEED_FIELDS:
                    if measurement.get(field) is not None:
                        samples.append(Sample(name=f"{METRIC_PREFIX}speed_{field}", labels=labels,
                                              value=float(measurement[field])))
    return samples


def _number(value: float) -> float | int:
    return int(value) if math.isfinite(value) and value == int(value) and abs(value) < 2**53 else value


def decode_result(samples: list[Sample]) -> tuple[Result, str | None]:
    """The result (and its signature) from the samples of ONE group; raises ProtocolError."""
    info = next((s for s in samples if s.name == INFO_METRIC), None)
    if info is None:
        raise ProtocolError(f"no {INFO_METRIC} series")
    kind = info.labels.get(KIND_LABEL, "")
    if kind not in RESULT_MODELS:
        raise ProtocolError(f"unknown result kind {kind!r}")
    data: dict[str, Any] = {}
    for name in LABEL_FIELDS[kind]:
        if name not in info.labels:
            continue
        text = info.labels[name]
        if name in ("notes", "candidates"):
            try:
                data[name] = json.loads(text)
            except ValueError as exc:
                raise ProtocolError(f"label {name}: {exc}") from None
        else:
            data[name] = text
    scalars = {f"{METRIC_PREFIX}{name}": name for name in SCALAR_FIELDS[kind]}
    maps = {f"{METRIC_PREFIX}{suffix}": (name, label) for name, (suffix, label) in MAP_FIELDS[kind].items()}
    speed_names = {f"{METRIC_PREFIX}speed_{field}": field for field in SPEED_FIELDS}
    for sample in samples:
        if sample.name in scalars:
            data[scalars[sample.name]] = sample.value
        elif sample.name in maps:
            name, label = maps[sample.name]
            data.setdefault(name, {})[sample.labels.get(label, "")] = sample.value
        elif sample.name in speed_names and SPEED_MAP_FIELDS[kind]:
            batch = sample.labels.get("batch_size", "")
            if kind == UnitKind.CONFIRM:
                target = data.setdefault("speed", {}).setdefault(sample.labels.get("candidate", ""), {})
            else:
                target = data.setdefault("speed", {})
            target.setdefault(batch, {})[speed_names[sample.name]] = _number(sample.value) \
                if speed_names[sample.name] in ("batch_size", "rounds", "runs_per_window", "threads",
                                                "contended_rounds", "requested_threads") \
                else sample.value
    for name in ("trial", "model_size_bytes"):
        if name in data and isinstance(data[name], float):
            data[name] = _number(data[name])
    try:
        result = RESULT_MODELS[kind].model_validate(data)
    except ValueError as exc:
        raise ProtocolError(f"invalid {kind} result: {exc}") from None
    return result, info.labels.get(SIGNATURE_LABEL)


def _series_labels() -> dict[str, frozenset[str]]:
    """metric name -> the labels the metric table itself gives its series (all others are grouping labels)."""
    out = {INFO_METRIC: frozenset({KIND_LABEL, SIGNATURE_LABEL, *(n for f in LABEL_FIELDS.values() for n in f)})}
    for kind in RESULT_MODELS:
        out.update({f"{METRIC_PREFIX}{name}": frozenset() for name in SCALAR_FIELDS[kind]})
        out.update({f"{METRIC_PREFIX}{suffix}": frozenset({key}) for suffix, key in MAP_FIELDS[kind].values()})
    out.update({f"{METRIC_PREFIX}speed_{field}": frozenset({"batch_size", "candidate"}) for field in SPEED_FIELDS})
    return out


SERIES_LABELS = _series_labels()


def group_unit(key: GroupKey) -> tuple[str, str] | None:
    """(job_uid, unit) of a group whose grouping labels are exactly a result's; None for any other group."""
    labels = dict(key)
    if set(labels) != {"job", *GROUP_LABELS} or labels["job"] != PUSH_JOB:
        return None
    return labels["job_uid"], labels["unit"]


def group_samples(samples: list[tuple[dict[str, str], float]]) -> dict[tuple[str, str], list[Sample]]:
    """The well-formed groups of `samples` (group_unit) by (job_uid, unit); every other group is left out."""
    groups = group_series(samples, METRIC_PREFIX, SERIES_LABELS)
    return {unit: group for key, group in groups.items() if (unit := group_unit(key)) is not None}


def result_of_termination(text: str | None) -> tuple[str, Result, str | None] | None:
    """(unit, result, signature) of a result termination message (qtune.runner.metrics.termination_result);
    None for any other (`Reason: message`, a log tail); ProtocolError when a tagged one does not decode."""
    doc = unpack_termination(text)
    if doc is None:
        return None
    if not isinstance(doc, dict) or doc.get("kind") not in RESULT_MODELS:
        raise ProtocolError("result message: no known result kind")
    try:
        result = RESULT_MODELS[doc["kind"]].model_validate(doc.get("result"))
    except ValueError as exc:
        raise ProtocolError(f"result message: invalid {doc['kind']} result: {exc}") from None
    return str(doc.get("unit", "")), result, str(doc["signature"]) if doc.get("signature") else None
