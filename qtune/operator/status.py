"""The job's status: the `JobStatus` model (which also generates the CRD's status schema, so the
two cannot drift) and pure projections of the session into it: state, conditions (Kubernetes API
conventions), counts, baseline, the winner with the ONE speed figure the session gives for it,
and a bounded list of recent trials (the history ConfigMap is the record of truth).
"""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from qtune.operator.mergepatch import merge_patch
from qtune.protocol import SpeedMeasurement
from qtune.tuning import codec, stop
from qtune.tuning.best import BestSummary
from qtune.tuning.front import FrontEntry, front_window
from qtune.tuning.history import FAILED, SUCCEEDED, Baseline, History, TrialRecord

# states
PENDING, BASELINE, RUNNING, SUCCEEDED_STATE, FAILED_STATE = "Pending", "Baseline", "Running", "Succeeded", "Failed"
STATES = (PENDING, BASELINE, RUNNING, SUCCEEDED_STATE, FAILED_STATE)
TERMINAL = frozenset({SUCCEEDED_STATE, FAILED_STATE})

# condition types
READY, RUNNING_COND, SUCCEEDED_COND, FAILED_COND = "Ready", "Running", "Succeeded", "Failed"
CONDITION_TYPES = (READY, RUNNING_COND, SUCCEEDED_COND, FAILED_COND)

# reasons beyond the session's stop reasons and outcomes (qtune.tuning.stop)
INVALID_SPEC = "InvalidSpec"
BASELINE_FAILED = stop.BASELINE_FAILED
HISTORY_TOO_LARGE = "HistoryTooLarge"
API_ERROR = "ApiError"
REASON_PENDING = "Pending"
REASON_BASELINE = "Baseline"
REASON_TUNING = "Tuning"
REASON_CONFIRMING = "Confirming"
RESUMED = "Resumed"
OBJECT_CONFLICT = "ObjectConflict"
"""An object of a name the job needs exists and is someone else's (never adopted, changed or deleted)."""
WAITING_FOR_CLEANUP = "WaitingForCleanup"
"""An earlier job of the same name still owns an object this job needs; the garbage collector removes it."""

WAITING_FOR_RESULTS = "WaitingForResults"
"""A unit's pod succeeded; its result is not queryable yet (Prometheus or the Pushgateway down or slow)."""
UNSCHEDULABLE = "Unschedulable"
"""A unit's pod has stayed unplaced longer than the operator's unschedulable_seconds (the scheduler's message)."""

QUEUED = "Queued"
"""Every unit the job runs waits for Kueue's admission (spec.trial.queueName; the pods carry Kueue's gate)."""

MESSAGE_LIMIT = 1024


def state_for_outcome(outcome: str) -> str:
    """Succeeded only for the session's success outcomes (a best config that is a success)."""
    return SUCCEEDED_STATE if stop.succeeded(outcome) else FAILED_STATE


# --------------------------------------------------------------------------------------------
# the model (camelCase in the API)
# --------------------------------------------------------------------------------------------


class StatusModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def dump(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Condition(StatusModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    last_transition_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    observed_generation: int | None = None


class TrialCounts(StatusModel):
    max: int = 0
    started: int = 0
    running: int = 0
    finished: int = 0
    succeeded: int = 0
    failed: int = 0
    passed: int = 0


class BaselineStatus(StatusModel):
    accuracy: float | None = Field(default=None, description="the fp32 model's score (see metric)")
    metric: str | None = Field(default=None, description="what accuracy is: a built-in metric, module:Name of "
                                                         "the job's own metric, or its evalFunc")
    latency_ms: dict[str, float] = Field(default_factory=dict, description="fp32 alone, p50 by batch size")
    latency_p90_ms: dict[str, float] = Field(default_factory=dict)
    model_size_bytes: int | None = None
    seconds: float | None = None


class _TuneConfigPart(StatusModel):
    model_config = ConfigDict(alias_generator=None, extra="forbid")


class TensorStatus(_TuneConfigPart):
    dtype: str
    scheme: str | None = None
    granularity: str | None = None
    algorithm: str | None = None
    reduce_range: bool | None = None


class OpStatus(_TuneConfigPart):
    op_type: str
    activation: TensorStatus
    weight: TensorStatus | None = None


class TuneConfigStatus(_TuneConfigPart):
    """A tune config as the runner reads it (snake_case keys, as in the history)."""

    approach: str
    format: str
    calibration_sampling_size: int | None = None
    ops: dict[str, OpStatus] = Field(default_factory=dict)
    extras: dict[str, Any] = Field(default_factory=dict, description="adaptor-specific options (free-form)")


class SpeedStatus(StatusModel):
    """The winner's speed against fp32: ONE interleaved measurement (the confirmation's when run)."""

    batch_size: int | str = Field(description="a batch size, or decode (time per new token, batch 1) / prefill")
    speedup: float
    low: float
    high: float
    latency_ms: float = Field(description="this model's p50 in the measurement")
    latency_p90_ms: float | None = None
    fp32_latency_ms: float = Field(description="fp32's p50 in the same measurement")
    fp32_latency_p90_ms: float | None = None
    confidence: float | None = None
    rounds: int | None = None
    confirmed: bool = Field(default=False, description="measured by the final confirmation")
    threads: int | None = Field(default=None, description="intra-op threads of the measurement")
    clock: str | None = Field(default=None, description="what timed each run: wall, or CPU (one thread)")
    busy: bool | None = Field(default=None, description="the trial's CPUs stayed contended while measuring")
    trusted: bool | None = Field(default=None, description="false: the machine was too busy for this figure; "
                                                           "nothing was decided on it")
    requested_threads: int | None = Field(
        default=None, description="set when the machine was too busy to measure with the job's threads: the "
                                  "count asked for (the figure is then one thread's, timed by CPU time)")
    exclusive_cpus: bool | None = Field(
        default=None, description="the trial pod ran on CPUs of its own (a cpuset of exactly its CPUs: Guaranteed "
                                  "QoS under the kubelet's static CPU manager policy); false: CPUs shared with "
                                  "other pods")
    note: str | None = Field(default=None, description="how busy the machine was, when it was")


class BestStatus(StatusModel):
    trial: int
    accuracy: float | None = None
    speedup: float | None = Field(default=None, description="= speed.speedup")
    speedup_interval: str | None = Field(default=None, description="speedup [low-high], for the printer column")
    speed: SpeedStatus | None = None
    model_size_bytes: int | None = None
    size_ratio: float | None = Field(default=None, description="fp32 size / int8 size")
    fp32_ops: int | None = None
    config_key: str | None = None
    model_path: str | None = None
    tune_config: TuneConfigStatus | None = None
    tune_config_omitted: str | None = Field(
        default=None, description="why tuneConfig is absent (too large for the status; the history ConfigMap "
                                  "and the workspace hold it)")


TUNE_CONFIG_STATUS_LIMIT = 64 * 1024
"""A winner's tune config larger than this (JSON bytes) stays out of the status: etcd objects are
bounded (about 1.5 MiB) and the history ConfigMap has it anyway."""


class TrialStatus(StatusModel):
    index: int
    status: str
    accuracy: float | None = None
    speedup: float | None = None
    latency_ms: float | None = Field(default=None, description="p50 at the objective batch size")
    model_size_bytes: int | None = None
    passed: bool | None = None
    reason: str | None = None
    message: str | None = None
    config_key: str | None = None
    fp32_ops: int | None = None
    seconds: float | None = None
    model_sha256: str | None = Field(default=None, description="sha256 of the trial's saved model (when saved)")


FRONT_STATUS_LIMIT = 5
"""Entries of the accuracy-speed front in the status (the ones nearest the winner); the history holds them all."""


class FrontEntryStatus(StatusModel):
    """A config on the accuracy-speed front: its figures, and its trial number (its tune config and model are
    that trial's in the history ConfigMap and the workspace)."""

    trial: int
    accuracy: float | None = None
    passed: bool = Field(description="meets the accuracy criterion")
    speedup: float = Field(description="over fp32 at the front's batch size (point estimate)")
    low: float
    high: float
    confirmed: bool = Field(default=False, description="the speedup is the final confirmation's re-measurement")
    model_size_bytes: int | None = None
    fp32_ops: int | None = None
    winner: bool = Field(default=False, description="the config the job chose (status.best)")


class FrontStatus(StatusModel):
    """The accuracy-speed front: configs no other measured config beats on both accuracy and speedup (point
    estimates), most accurate first; at most 5 of them, around the winner."""

    batch_size: int | str = Field(description="the speed figure: a batch size, or decode (time per new token)")
    total: int = Field(description="configs on the whole front (entries lists at most 5 of them)")
    entries: list[FrontEntryStatus] = Field(default_factory=list, max_length=FRONT_STATUS_LIMIT)


class HistoryRef(StatusModel):
    config_map: str
    trials: int = 0
    sequence: int | None = Field(default=None, description="the stored history's sequence: an older one is refused")


class JobStatus(StatusModel):
    """Written by the operator. The full trial history is in the ConfigMap named in history.configMap."""

    state: Literal["Pending", "Baseline", "Running", "Succeeded", "Failed"] | None = None
    reason: str | None = Field(default=None, description="why the job is in its state (the outcome when done)")
    stop_reason: str | None = Field(default=None, description="the stop rule that ended the search")
    message: str | None = None
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    start_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    completion_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    elapsed_seconds: float | None = None
    workspace: str | None = None
    progress: str | None = Field(default=None, description="finished/max trials")
    trials: TrialCounts | None = None
    baseline: BaselineStatus | None = None
    best: BestStatus | None = None
    recent_trials: list[TrialStatus] = Field(default_factory=list)
    front: FrontStatus | None = None
    history: HistoryRef | None = None
    rejected_results: int | None = Field(default=None, description="results ignored for lack of proof of origin")


MANAGED_KEYS = frozenset(JobStatus.model_json_schema(by_alias=True)["properties"])
"""Status keys the operator owns; others (e.g. Kopf's own `status.kopf`) are never touched."""


# --------------------------------------------------------------------------------------------
# conditions
# --------------------------------------------------------------------------------------------


def now_iso(now: float | None = None) -> str:
    moment = datetime.fromtimestamp(now, UTC) if now is not None else datetime.now(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(conditions: list[dict[str, Any]], type_: str, status: bool, reason: str, message: str,
                  generation: int | None, now: float | None = None) -> list[dict[str, Any]]:
    """Conditions with `type_` set; lastTransitionTime changes only when the status flips."""
    value = "True" if status else "False"
    out = [dict(cond) for cond in conditions if cond.get("type") != type_]
    old = next((cond for cond in conditions if cond.get("type") == type_), None)
    transition = old.get("lastTransitionTime") if old and old.get("status") == value else None
    cond: dict[str, Any] = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message[:MESSAGE_LIMIT],
        "lastTransitionTime": transition or now_iso(now),
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    out.append(cond)
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(out, key=lambda cond: order.get(cond.get("type", ""), len(order)))


def conditions_for(state: str, reason: str, message: str, generation: int | None,
                   old: list[dict[str, Any]] | None, now: float | None = None) -> list[dict[str, Any]]:
    """The four conditions of a state:

    state      Ready   Running  Succeeded  Failed
    Pending    False   False    False      False
    Baseline   False   True     False      False
    Running    False   True     False      False
    Succeeded  True    False    True       False
    Failed     False   False    False      True
    """
    conditions = list(old or [])
    values = {
        READY: state == SUCCEEDED_STATE,
        RUNNING_COND: state in (BASELINE, RUNNING),
        SUCCEEDED_COND: state == SUCCEEDED_STATE,
        FAILED_COND: state == FAILED_STATE,
    }
    for type_, value in values.items():
        conditions = set_condition(conditions, type_, value, reason, message, generation, now)
    return conditions


# --------------------------------------------------------------------------------------------
# projections
# --------------------------------------------------------------------------------------------


def _finite(value: float | None, digits: int = 6) -> float | None:
    if value is None or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return round(float(value), digits)


def trial_status(record: TrialRecord, batch_size: int | str) -> TrialStatus:
    seconds = record.finished_at - record.started_at if record.started_at and record.finished_at else None
    measured = record.speed_at(batch_size)
    return TrialStatus(
        index=record.index, status=record.status, accuracy=_finite(record.accuracy),
        speedup=_finite(measured.speedup, 4) if measured else None,
        latency_ms=_finite(measured.p50_ms, 4) if measured else None,
        model_size_bytes=record.model_size_bytes, passed=record.passed, reason=record.reason,
        message=(record.message or "")[:300] or None, config_key=record.config_key,
        fp32_ops=len(record.tune_config.fp32_ops()), seconds=_finite(seconds, 2), model_sha256=record.model_sha256)


def baseline_status(baseline: Baseline) -> BaselineStatus:
    return BaselineStatus(
        accuracy=_finite(baseline.accuracy),
        latency_ms={k: v for k, v in ((k, _finite(v, 4)) for k, v in baseline.latency_ms.items()) if v is not None},
        latency_p90_ms={k: v for k, v in ((k, _finite(v, 4)) for k, v in baseline.latency_p90_ms.items())
                        if v is not None},
        model_size_bytes=baseline.model_size_bytes, seconds=_finite(baseline.seconds, 2), metric=baseline.metric)


def speed_status(measured: SpeedMeasurement, confirmed: bool, key: int | str | None = None) -> SpeedStatus:
    """`key`: the figure's speed key; a decode/prefill figure is named so, not by the batch size 1 it ran at."""
    return SpeedStatus(
        batch_size=str(key) if key is not None and not str(key).isdigit() else measured.batch_size,
        speedup=round(measured.speedup, 4), low=round(measured.low, 4), high=round(measured.high, 4),
        latency_ms=round(measured.p50_ms, 5), latency_p90_ms=round(measured.p90_ms, 5),
        fp32_latency_ms=round(measured.fp32_p50_ms, 5), fp32_latency_p90_ms=round(measured.fp32_p90_ms, 5),
        confidence=measured.confidence, rounds=measured.rounds, confirmed=confirmed, threads=measured.threads or None,
        clock=measured.clock_name, busy=measured.busy, trusted=measured.trusted,
        requested_threads=measured.requested_threads or None, exclusive_cpus=measured.exclusive_cpus,
        note=measured.caveat())


def best_status(best: BestSummary, model_path: str | None = None, speed_key: int | str | None = None) -> BestStatus:
    """status.best: the session's BestSummary (the same best_config.json shows) in the status' names; `model_path`
    where the winner's model is when its record does not say; `speed_key` its speed figure's key (or decode)."""
    speed = speed_status(best.speed, best.confirmed, speed_key) if best.speed is not None else None
    return BestStatus(
        trial=best.trial, accuracy=_finite(best.accuracy),
        speedup=speed.speedup if speed else None,
        speedup_interval=f"{speed.speedup:.2f} [{speed.low:.2f}-{speed.high:.2f}]" if speed else None,
        speed=speed, model_size_bytes=best.model_size_bytes, size_ratio=_finite(best.size_ratio, 3),
        fp32_ops=len(best.fp32_ops), config_key=best.config_key,
        model_path=best.model_path or model_path, **_tune_config_fields(best))


def front_status(front: list[FrontEntry], batch_size: int | str, limit: int = FRONT_STATUS_LIMIT) -> FrontStatus | None:
    """The front as the status shows it: bounded to `limit` entries around the winner; None when empty."""
    if not front:
        return None
    return FrontStatus(batch_size=batch_size, total=len(front), entries=[
        FrontEntryStatus(trial=e.trial, accuracy=_finite(e.accuracy), passed=e.passed,
                         speedup=round(e.speed.speedup, 4), low=round(e.speed.low, 4), high=round(e.speed.high, 4),
                         confirmed=e.confirmed, model_size_bytes=e.model_size_bytes, fp32_ops=e.fp32_ops,
                         winner=e.winner)
        for e in front_window(front, limit)])


def _tune_config_fields(best: BestSummary) -> dict[str, Any]:
    data = codec.dump(best.tune_config)
    size = len(json.dumps(data, separators=(",", ":")))
    if size > TUNE_CONFIG_STATUS_LIMIT:
        return {"tune_config_omitted": f"{size} bytes for {len(best.tune_config.ops)} ops: see trial {best.trial} "
                                       "in the history ConfigMap"}
    return {"tune_config": TuneConfigStatus.model_validate(data)}


def counts(history: History, max_trials: int) -> TrialCounts:
    trials = history.trials
    return TrialCounts(max=max_trials, started=len(trials), running=len(history.pending()),
                       finished=len(history.finished()),
                       succeeded=sum(1 for t in trials if t.status == SUCCEEDED),
                       failed=sum(1 for t in trials if t.status == FAILED),
                       passed=sum(1 for t in trials if t.passed))


def build_status(*, state: str, reason: str, message: str, generation: int | None,
                 old: dict[str, Any] | None, history: History | None = None, max_trials: int | None = None,
                 batch_size: int | str = 1, best: BestStatus | None = None, front: FrontStatus | None = None,
                 recent: int = 20,
                 history_configmap: str | None = None, workspace: str | None = None,
                 stop_reason: str | None = None, rejected: int = 0, now: float | None = None) -> dict[str, Any]:
    """The whole managed status of a job (what the operator wants it to be) at `now` (default: the time of day),
    as the API stores it."""
    old = old or {}
    now = now if now is not None else time.time()
    status = JobStatus(
        state=state,  # type: ignore[arg-type]
        reason=reason, message=message[:MESSAGE_LIMIT], observed_generation=generation,
        conditions=[Condition.model_validate(cond) for cond in
                    conditions_for(state, reason, message, generation, old.get("conditions"), now)],
        start_time=old.get("startTime") or now_iso(now), stop_reason=stop_reason, workspace=workspace,
        rejected_results=rejected or None,
    )
    if state in TERMINAL:
        status.completion_time = (old.get("completionTime") if old.get("state") == state else None) or now_iso(now)
    if history is not None and max_trials is not None:
        status.trials = counts(history, max_trials)
        status.progress = f"{status.trials.finished}/{max_trials}"
        records = sorted(history.trials, key=lambda t: t.index)[-recent:] if recent > 0 else []
        status.recent_trials = [trial_status(r, batch_size) for r in records]
        status.elapsed_seconds = round(history.elapsed(now), 1)
        if history.baseline is not None:
            status.baseline = baseline_status(history.baseline)
        status.best = best
        status.front = front
    if history_configmap:
        status.history = HistoryRef(config_map=history_configmap, trials=len(history.trials) if history else 0,
                                    sequence=history.sequence or None if history is not None else None)
    out = status.dump()
    if "history" not in out and isinstance(old.get("history"), dict):  # not known now: what it recorded stays
        out["history"] = old["history"]
    if not out.get("recentTrials"):
        out.pop("recentTrials", None)
    return out


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any] | None:
    """Merge patch of the managed part of the status; None when nothing changed."""
    managed = {k: v for k, v in (old or {}).items() if k in MANAGED_KEYS}
    return merge_patch(managed, new)
