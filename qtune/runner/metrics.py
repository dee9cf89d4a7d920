"""A unit's result as Prometheus metrics, pushed to a Pushgateway (the cluster's result channel).

The series are the metric table of `qtune.protocol` (`encode_result`): every field of the result,
numbers as values and strings as labels of `qtune_result_info`, which also carries the result's
signature. Grouping key: {job_uid, unit} under job `qtune_result`. A pod signs with the secret
the operator gave it alone (env QTUNE_RESULT_SECRET, from its own Secret); the operator reads the
series through the Prometheus HTTP API, verifies the signature, records the result and deletes
the group.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, delete_from_gateway, push_to_gateway
from prometheus_client.exposition import default_handler
from prometheus_client.metrics_core import Metric

from qtune import protocol
from qtune.protocol import Result, Sample

logger = logging.getLogger(__name__)

PUSH_JOB = protocol.PUSH_JOB
PUSH_BACKOFF = 2.0
PUSH_MAX_DELAY = 30.0
PUSH_RETRY_SECONDS = 900.0
PUSH_RETRY_ENV = "QTUNE_PUSH_RETRY_SECONDS"
"""A unit's result push is retried on connection errors, timeouts, 429 and 5xx answers, waiting 2, 4, 8,
16, then 30 s between attempts, for up to PUSH_RETRY_SECONDS in all (env QTUNE_PUSH_RETRY_SECONDS): a
Pushgateway outage of several minutes loses no result. The pod's own time limit (activeDeadlineSeconds)
still bounds it. A 4xx answer is final. Every unit's push is required, the baseline's too."""


def push_retry_seconds() -> float:
    """How long a required push is retried: env QTUNE_PUSH_RETRY_SECONDS, else PUSH_RETRY_SECONDS."""
    text = os.environ.get(PUSH_RETRY_ENV, "").strip()
    if not text:
        return PUSH_RETRY_SECONDS
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{PUSH_RETRY_ENV}={text!r}: expected a number of seconds (>= 0)") from None
    if value < 0:
        raise ValueError(f"{PUSH_RETRY_ENV}={text!r}: expected a number of seconds (>= 0)")
    return value
SECRET_ENV = "QTUNE_RESULT_SECRET"
"""Env var holding this pod's result secret (set by the operator through secretKeyRef)."""
ATTEMPT_ENV = "QTUNE_UNIT_ATTEMPT"
"""Env var holding which start of its unit this pod is (the attempt its secret was derived for)."""


def unit_attempt() -> int | None:
    """This pod's attempt (env QTUNE_UNIT_ATTEMPT), None when unset or not a number."""
    text = os.environ.get(ATTEMPT_ENV, "").strip()
    return int(text) if text.isdigit() else None


def credential_handler(secret: str, attempt: int) -> Callable[..., Callable[[], None]]:
    """A prometheus_client push handler that adds the unit's write credential for the results gateway
    (`Authorization: Bearer <attempt>:<HMAC(secret, method, sha256(body))>`, qtune.wire.push_authorization).
    A plain Pushgateway ignores the header; the credential is good for these exact bytes only."""

    def handler(url: str, method: str, timeout: float | None, headers: list[tuple[str, str]],
                data: bytes) -> Callable[[], None]:
        auth = protocol.push_authorization(secret, attempt, method, data)
        return default_handler(url, method, timeout, [*headers, ("Authorization", auth)], data)

    return handler

HELP = {
    protocol.INFO_METRIC: "a unit's result: kind, status and string fields as labels, and its signature",
    f"{protocol.METRIC_PREFIX}accuracy": "accuracy metric on the evaluation set",
    f"{protocol.METRIC_PREFIX}model_size_bytes": "model size in bytes",
}


def grouping_key(job_uid: str, unit: str) -> dict[str, str]:
    return {"job_uid": job_uid, "unit": unit}


def unit_id(unit: int | str) -> str:
    """"trial-3" for 3 or "3"; other unit ids as they are."""
    text = str(unit)
    return protocol.trial_unit(int(text)) if text.isdigit() else text


class _SampleCollector:
    """A prometheus_client collector exposing fixed samples as gauges."""

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for sample in self.samples:
            family = families.get(sample.name)
            if family is None:
                family = Metric(sample.name, HELP.get(sample.name, sample.name.replace("_", " ")), "gauge")
                families[sample.name] = family
            family.add_sample(sample.name, dict(sample.labels), sample.value)
        yield from families.values()


def result_registry(result: Result, signature: str | None = None) -> CollectorRegistry:
    """A registry holding the metric table of one result."""
    registry = CollectorRegistry()
    registry.register(_SampleCollector(protocol.encode_result(result, signature)))  # type: ignore[arg-type]
    return registry


def as_result(unit: str, result: Result | dict[str, Any]) -> Result:
    """A protocol result; a dict is read as the model of the unit's kind."""
    if not isinstance(result, dict):
        return result
    data = dict(result)
    if unit == protocol.UnitKind.BASELINE:
        return protocol.BaselineResult.model_validate(data)
    if unit == protocol.UnitKind.CONFIRM:
        return protocol.ConfirmResult.model_validate(data)
    index = protocol.unit_trial_index(unit)
    if "trial" not in data and index is not None:
        data["trial"] = index
    return protocol.TrialResult.model_validate(data)


T = TypeVar("T")


def retryable(exc: BaseException) -> bool:
    """A push failure worth retrying: the gateway unreachable or failing, not refusing the request."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code == 429
    return isinstance(exc, OSError)  # URLError, ConnectionError, timeouts


def with_retry(action: Callable[[], T], what: str, *, attempts: int | None = None, backoff: float | None = None,
               max_delay: float | None = None, sleep: Callable[[float], None] | None = None,
               total: float | None = None, clock: Callable[[], float] = time.monotonic) -> T:
    """`action()`, retried with capped exponential backoff while it fails in a `retryable` way: at most
    `attempts` times when given, else for up to `total` seconds (default push_retry_seconds()); the
    delays are PUSH_BACKOFF doubling up to PUSH_MAX_DELAY."""
    delay = PUSH_BACKOFF if backoff is None else backoff
    max_delay = PUSH_MAX_DELAY if max_delay is None else max_delay
    sleep = sleep or time.sleep
    if attempts is None and total is None:
        total = push_retry_seconds()
    start, slept, attempt = clock(), 0.0, 0
    while True:
        attempt += 1
        try:
            return action()
        except Exception as exc:
            spent = max(clock() - start, slept)
            out_of_attempts = attempts is not None and attempt >= attempts
            out_of_time = total is not None and spent + delay > total
            if out_of_attempts or out_of_time or not retryable(exc):
                raise
            limit = f"of {attempts}" if attempts is not None else f"within {total:g} s"
            logger.warning("%s failed (attempt %d %s: %s); retrying in %.0f s", what, attempt, limit, exc, delay)
            sleep(delay)
            slept += delay
            delay = min(delay * 2, max_delay)


def push_result(gateway: str, job_uid: str, unit: int | str, result: Result | dict[str, Any],
                secret: str | None = None, *, attempts: int | None = None, backoff: float | None = None,
                sleep: Callable[[float], None] | None = None, attempt: int | None = None) -> str | None:
    """Sign (with `secret`, default env QTUNE_RESULT_SECRET) and push one result, retrying (see
    PUSH_RETRY_SECONDS; `attempts` bounds the count instead) while the gateway is unreachable or failing;
    returns the signature. With a secret and the pod's `attempt` (default env QTUNE_UNIT_ATTEMPT) the push
    carries the unit's write credential, which the results gateway requires."""
    unit = unit_id(unit)
    message = as_result(unit, result)
    secret = secret if secret is not None else os.environ.get(SECRET_ENV)
    signature = protocol.sign_result(job_uid, unit, message, secret) if secret else None
    if signature is None:
        logger.warning("no result secret (%s): the result of %s is pushed unsigned; an operator ignores it",
                       SECRET_ENV, unit)
    registry = result_registry(message, signature)
    attempt = attempt if attempt is not None else unit_attempt()
    handler = credential_handler(secret, attempt) if secret and attempt is not None else default_handler
    with_retry(lambda: push_to_gateway(gateway, job=PUSH_JOB, registry=registry, handler=handler,
                                       grouping_key=grouping_key(job_uid, unit), timeout=10),
               f"pushing the result of {unit} to {gateway}", attempts=attempts, backoff=backoff, sleep=sleep)
    logger.info("pushed the result of %s (job %s) to %s", unit, job_uid, gateway)
    return signature


def termination_result(unit: int | str, result: Result | dict[str, Any], signature: str) -> str | None:
    """The pod's termination message carrying its signed result (what only the kubelet copies into the pod's
    status, so no other tenant can alter, delete or delay it; the operator prefers it to the pushed copy);
    None when it does not fit in the 4096 bytes Kubernetes keeps (then the push alone carries it)."""
    unit = unit_id(unit)
    message = as_result(unit, result)
    return protocol.pack_termination({"unit": unit, "kind": protocol.result_kind(message).value,
                                      "signature": signature, "result": message.model_dump(mode="python")})


def delete_result(gateway: str, job_uid: str, unit: int | str) -> None:
    delete_from_gateway(gateway, job=PUSH_JOB, grouping_key=grouping_key(job_uid, unit_id(unit)), timeout=10)
