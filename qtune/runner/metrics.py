"""Trial results as Prometheus metrics, pushed to a Pushgateway.

Grouping key: {job_uid, trial}. The operator reads these series through the Prometheus HTTP API
(Prometheus scrapes the Pushgateway with honor_labels: true), copies them into the job status
and deletes the group.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, delete_from_gateway, push_to_gateway

logger = logging.getLogger(__name__)

PUSH_JOB = "qtune_trial"
STATUS_CODES = {"succeeded": 1, "failed": 0}


def grouping_key(job_uid: str, trial: int | str) -> dict[str, str]:
    return {"job_uid": job_uid, "trial": str(trial)}


def result_registry(result: dict[str, Any]) -> CollectorRegistry:
    """Gauges for one trial (or the baseline, trial="baseline") result."""
    registry = CollectorRegistry()
    status = Gauge("qtune_trial_status", "1 when the trial succeeded, 0 when it failed", registry=registry)
    status.set(STATUS_CODES.get(result.get("status", "failed"), 0))
    if result.get("accuracy") is not None:
        Gauge("qtune_trial_accuracy", "accuracy metric of the trial", registry=registry).set(result["accuracy"])
    p50 = Gauge("qtune_trial_latency_p50_ms", "median batch latency", ["batch_size"], registry=registry)
    p90 = Gauge("qtune_trial_latency_p90_ms", "p90 batch latency", ["batch_size"], registry=registry)
    for batch, value in (result.get("latency_ms") or {}).items():
        p50.labels(batch_size=str(batch)).set(value)
    for batch, value in (result.get("latency_p90_ms") or {}).items():
        p90.labels(batch_size=str(batch)).set(value)
    fp32 = Gauge("qtune_trial_fp32_latency_p50_ms", "fp32 median batch latency, measured interleaved in the trial",
                 ["batch_size"], registry=registry)
    for batch, value in (result.get("fp32_latency_ms") or {}).items():
        fp32.labels(batch_size=str(batch)).set(value)
    if result.get("model_size_bytes") is not None:
        Gauge("qtune_trial_model_size_bytes", "quantized model size", registry=registry).set(
            result["model_size_bytes"]
        )
    duration = Gauge("qtune_trial_duration_seconds", "seconds per phase", ["phase"], registry=registry)
    for phase, seconds in (result.get("timings") or {}).items():
        duration.labels(phase=phase).set(seconds)
    return registry


def push_result(gateway: str, job_uid: str, trial: int | str, result: dict[str, Any]) -> None:
    push_to_gateway(gateway, job=PUSH_JOB, registry=result_registry(result),
                    grouping_key=grouping_key(job_uid, trial), timeout=10)
    logger.info("pushed trial %s of job %s to %s", trial, job_uid, gateway)


def delete_result(gateway: str, job_uid: str, trial: int | str) -> None:
    delete_from_gateway(gateway, job=PUSH_JOB, grouping_key=grouping_key(job_uid, trial), timeout=10)
