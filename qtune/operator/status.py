"""The job's status: state, conditions (Kubernetes API conventions), counts, baseline, best, and a
bounded list of recent trials. Pure functions of the history; the status is a projection of it
(the history ConfigMap is the record of truth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from qtune.tuning import stop
from qtune.tuning.history import FAILED, SUCCEEDED, Baseline, History, TrialRecord

# states
PENDING, BASELINE, RUNNING, SUCCEEDED_STATE, FAILED_STATE = "Pending", "Baseline", "Running", "Succeeded", "Failed"
TERMINAL = frozenset({SUCCEEDED_STATE, FAILED_STATE})

# condition types
READY, RUNNING_COND, SUCCEEDED_COND, FAILED_COND = "Ready", "Running", "Succeeded", "Failed"
CONDITION_TYPES = (READY, RUNNING_COND, SUCCEEDED_COND, FAILED_COND)

# reasons beyond the stop reasons of qtune.tuning.stop
INVALID_SPEC = "InvalidSpec"
BASELINE_FAILED = "BaselineFailed"
REASON_PENDING = "Pending"
REASON_BASELINE = "Baseline"
REASON_TUNING = "Tuning"
RESUMED = "Resumed"

FAILED_REASONS = frozenset({INVALID_SPEC, BASELINE_FAILED, stop.NO_CONFIG, stop.TOO_MANY_FAILURES})
"""Outcomes that leave the job Failed; every other stop reason with a best config is Succeeded."""

MESSAGE_LIMIT = 1024


def now_iso(now: float | None = None) -> str:
    moment = datetime.fromtimestamp(now, UTC) if now is not None else datetime.now(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def state_for_outcome(outcome: str) -> str:
    return FAILED_STATE if outcome in FAILED_REASONS else SUCCEEDED_STATE


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


def find_condition(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    return next((cond for cond in conditions or [] if cond.get("type") == type_), None)


# --------------------------------------------------------------------------------------------
# projections of history records
# --------------------------------------------------------------------------------------------


def _finite(value: float | None, digits: int = 6) -> float | None:
    if value is None or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return round(float(value), digits)


def _clean(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


def trial_summary(record: TrialRecord, batch_size: int) -> dict[str, Any]:
    seconds = None
    if record.started_at and record.finished_at:
        seconds = record.finished_at - record.started_at
    return _clean({
        "index": record.index,
        "status": record.status,
        "accuracy": _finite(record.accuracy),
        "latencyMs": _finite(record.latency(batch_size), 4),
        "modelSizeBytes": record.model_size_bytes,
        "passed": record.passed,
        "reason": record.reason,
        "message": (record.message or "")[:300] or None,
        "configKey": record.config_key,
        "fp32Ops": len(record.config.fp32_ops()),
        "seconds": _finite(seconds, 2),
    })


def baseline_summary(baseline: Baseline) -> dict[str, Any]:
    return _clean({
        "accuracy": _finite(baseline.accuracy),
        "latencyMs": {k: _finite(v, 4) for k, v in baseline.latency_ms.items() if _finite(v) is not None},
        "latencyP90Ms": {k: _finite(v, 4) for k, v in baseline.latency_p90_ms.items() if _finite(v) is not None},
        "modelSizeBytes": baseline.model_size_bytes,
        "seconds": _finite(baseline.seconds, 2),
    })


def best_summary(record: TrialRecord, baseline: Baseline | None, batch_size: int,
                 model_path: str | None = None) -> dict[str, Any]:
    latency = record.latency(batch_size)
    speedup = size_ratio = None
    if baseline is not None:
        base_latency = baseline.latency_ms.get(str(batch_size))
        if base_latency and latency:
            speedup = base_latency / latency
        if baseline.model_size_bytes and record.model_size_bytes:
            size_ratio = baseline.model_size_bytes / record.model_size_bytes
    return _clean({
        "trial": record.index,
        "accuracy": _finite(record.accuracy),
        "latencyMs": _finite(latency, 4),
        "latencyP90Ms": _finite(record.latency_p90_ms.get(str(batch_size)), 4),
        "batchSize": batch_size,
        "speedup": _finite(speedup, 3),
        "modelSizeBytes": record.model_size_bytes,
        "sizeRatio": _finite(size_ratio, 3),
        "fp32Ops": len(record.config.fp32_ops()),
        "configKey": record.config_key,
        "modelPath": record.model_path or model_path,
        "tuneConfig": record.tune_config,
    })


def describe_best(best: dict[str, Any] | None, baseline: Baseline | None) -> str:
    if not best:
        return "no trial met the accuracy criterion"
    parts = [f"best trial {best['trial']}: accuracy {best.get('accuracy', float('nan')):.4f}"]
    if baseline is not None:
        parts[0] += f" (fp32 {baseline.accuracy:.4f})"
    if best.get("speedup"):
        parts.append(f"{best['speedup']:.2f}x faster at batch {best.get('batchSize')}")
    if best.get("sizeRatio"):
        parts.append(f"{best['sizeRatio']:.2f}x smaller")
    parts.append(f"{best.get('fp32Ops', 0)} ops in fp32")
    return ", ".join(parts)


@dataclass
class Counts:
    max: int
    started: int
    running: int
    finished: int
    succeeded: int
    failed: int
    passed: int

    @classmethod
    def of(cls, history: History, max_trials: int) -> Counts:
        trials = history.trials
        return cls(
            max=max_trials,
            started=len(trials),
            running=len(history.pending()),
            finished=len(history.finished()),
            succeeded=sum(1 for t in trials if t.status == SUCCEEDED),
            failed=sum(1 for t in trials if t.status == FAILED),
            passed=sum(1 for t in trials if t.passed),
        )

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def recent_trials(history: History, batch_size: int, limit: int) -> list[dict[str, Any]]:
    """The last `limit` trials by index (running ones included)."""
    records = sorted(history.trials, key=lambda t: t.index)[-limit:] if limit > 0 else []
    return [trial_summary(r, batch_size) for r in records]


def build_status(*, state: str, reason: str, message: str, generation: int | None,
                 old: dict[str, Any] | None, history: History | None = None, max_trials: int | None = None,
                 batch_size: int = 1, best: TrialRecord | None = None, best_model_path: str | None = None,
                 recent: int = 20, history_configmap: str | None = None, workspace: str | None = None,
                 stop_reason: str | None = None, now: float | None = None) -> dict[str, Any]:
    """The whole status of a job (what the operator wants it to be)."""
    old = old or {}
    status: dict[str, Any] = {
        "state": state,
        "reason": reason,
        "message": message[:MESSAGE_LIMIT],
        "observedGeneration": generation,
        "conditions": conditions_for(state, reason, message, generation, old.get("conditions"), now),
        "startTime": old.get("startTime") or now_iso(now),
    }
    if state in TERMINAL:
        status["completionTime"] = old.get("completionTime") if old.get("state") == state else None
        status["completionTime"] = status["completionTime"] or now_iso(now)
    if stop_reason:
        status["stopReason"] = stop_reason
    if workspace:
        status["workspace"] = workspace
    if history is not None and max_trials is not None:
        counts = Counts.of(history, max_trials)
        status["trials"] = counts.as_dict()
        status["progress"] = f"{counts.finished}/{max_trials}"
        status["recentTrials"] = recent_trials(history, batch_size, recent)
        status["elapsedSeconds"] = round(history.elapsed_seconds, 1)
        if history.baseline is not None:
            status["baseline"] = baseline_summary(history.baseline)
        if best is not None:
            status["best"] = best_summary(best, history.baseline, batch_size, best_model_path)
    if history_configmap:
        status["history"] = {"configMap": history_configmap,
                             "trials": len(history.trials) if history is not None else 0}
    return {k: v for k, v in status.items() if v is not None}


def merge_patch(old: Any, new: Any) -> Any:
    """The RFC 7386 JSON merge patch turning `old` into `new` (None when equal).

    Keys missing from `new` become null (deleted); lists and scalars are replaced whole."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return None if old == new else new
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = value
            continue
        if isinstance(value, dict) and isinstance(old[key], dict):
            sub = merge_patch(old[key], value)
            if sub:
                patch[key] = sub
        elif old[key] != value:
            patch[key] = value
    return patch or None


MANAGED_KEYS = frozenset({
    "state", "reason", "message", "observedGeneration", "conditions", "startTime", "completionTime",
    "stopReason", "workspace", "trials", "progress", "recentTrials", "elapsedSeconds", "baseline", "best",
    "history",
})
"""Status keys the operator owns; others (e.g. Kopf's own `status.kopf`) are never touched."""


def status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any] | None:
    """Merge patch of the managed part of the status; None when nothing changed."""
    managed = {k: v for k, v in (old or {}).items() if k in MANAGED_KEYS}
    return merge_patch(managed, new)
