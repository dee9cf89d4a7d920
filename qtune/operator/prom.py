"""Async clients of the Prometheus HTTP API (unit results) and of the Pushgateway (clean-up).

Pods push their result under the Pushgateway grouping key {job_uid, unit} (job `qtune_result`;
the series are qtune.protocol's metric table, see qtune/runner/metrics.py); Prometheus scrapes the
Pushgateway with honor_labels. The operator reads results with instant queries, decodes them with
the protocol, believes them only with proof of origin (qtune/operator/results.py), records them
and deletes the group. Nothing here blocks the event loop (aiohttp).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import quote

import aiohttp

from qtune import protocol
from qtune.operator.results import Observed

logger = logging.getLogger(__name__)

PUSH_JOB = protocol.PUSH_JOB
METRIC_PREFIX = protocol.METRIC_PREFIX


class MetricsError(RuntimeError):
    """Prometheus or the Pushgateway could not be reached or answered an error."""


def label_value(value: str) -> str:
    """A PromQL string literal body: backslashes and double quotes escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def job_query(job_uid: str) -> str:
    return f'{{__name__=~"{METRIC_PREFIX}.+",job="{PUSH_JOB}",job_uid="{label_value(job_uid)}"}}'


ALL_QUERY = f'{{__name__=~"{METRIC_PREFIX}.+",job="{PUSH_JOB}"}}'
"""Every job's queryable results at once (what the operator-wide poller asks)."""


def _value(sample: dict[str, Any]) -> float | None:
    try:
        return float(sample["value"][1])
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def results_by_job(vector: list[dict[str, Any]]) -> dict[str, dict[str, Observed]]:
    """Prometheus instant-vector samples -> {job_uid: {unit: Observed}}. Groups that do not decode
    (a partial or malformed push) are left out and logged."""
    pairs = [(dict(s.get("metric") or {}), v) for s in vector if (v := _value(s)) is not None]
    out: dict[str, dict[str, Observed]] = {}
    for (uid, unit), samples in protocol.group_samples(pairs).items():
        try:
            result, signature = protocol.decode_result(samples)
        except protocol.ProtocolError as exc:
            logger.warning("job %s, unit %s: undecodable result ignored: %s", uid, unit, exc)
            continue
        out.setdefault(uid, {})[unit] = Observed(unit, result, signature)
    return out


class PrometheusClient:
    """Instant queries against /api/v1/query."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    async def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"{self.base_url}/api/v1/query"
        try:
            async with self.session.post(url, data={"query": promql}, timeout=self.timeout) as response:
                payload = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise MetricsError(f"Prometheus query failed ({url}): {exc}") from exc
        if payload.get("status") != "success":
            raise MetricsError(f"Prometheus query failed: {payload.get('errorType')}: {payload.get('error')}")
        data = payload.get("data") or {}
        if data.get("resultType") != "vector":
            raise MetricsError(f"Prometheus returned {data.get('resultType')!r}, expected a vector")
        return list(data.get("result") or [])

    async def job_results(self, job_uid: str) -> dict[str, Observed]:
        """Every result of the job currently queryable, by unit id."""
        return results_by_job(await self.query(job_query(job_uid))).get(job_uid, {})

    async def all_results(self) -> dict[str, dict[str, Observed]]:
        """Every job's queryable results: {job_uid: {unit: Observed}}."""
        return results_by_job(await self.query(ALL_QUERY))


class ResultsPoller:
    """One operator-wide query every `interval` seconds: a job whose trial result just became
    queryable is woken at once (its loop records the result even before the pod is reported
    finished). One query for all jobs keeps the load on Prometheus independent of their number."""

    def __init__(self, prometheus: PrometheusClient, interval: float, wakeups: dict[str, Any],
                 errors: Any | None = None) -> None:
        self.prometheus = prometheus
        self.interval = interval
        self.wakeups = wakeups
        self.errors = errors
        """The operator's error counter (labels `kind`), counted once per failed poll."""
        self.snapshot: dict[str, dict[str, Observed]] = {}
        self.taken_at: float | None = None
        self.last_error: str | None = None
        self.failures = 0

    def results(self, job_uid: str) -> dict[str, Observed]:
        return self.snapshot.get(job_uid, {})

    async def poll_once(self) -> None:
        snapshot = await self.prometheus.all_results()
        for uid, trials in snapshot.items():
            if set(trials) - set(self.snapshot.get(uid, {})):
                event = self.wakeups.get(uid)
                if event is not None:
                    event.set()
        self.snapshot = snapshot
        self.taken_at = time.time()

    async def run(self) -> None:
        """Poll until cancelled: no error ends the loop (a bug is logged with its traceback and counted)."""
        while True:
            try:
                await self.poll_once()
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except MetricsError as exc:
                self._failed("prometheus", str(exc))
                logger.warning("results poller: %s", exc)
            except Exception as exc:  # noqa: BLE001 - the poller must outlive any bug
                self._failed(f"poller_{type(exc).__name__}", f"{type(exc).__name__}: {exc}")
                logger.exception("results poller: unexpected error, polling on")
            await asyncio.sleep(self.interval if self.last_error is None else max(self.interval, 2.0))

    def _failed(self, kind: str, message: str) -> None:
        self.last_error = message
        self.failures += 1
        if self.errors is not None:
            self.errors.labels(kind=kind[:64]).inc()


class PushgatewayClient:
    def __init__(self, base_url: str, session: aiohttp.ClientSession, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    def group_url(self, job_uid: str, unit: str) -> str:
        return (f"{self.base_url}/metrics/job/{quote(PUSH_JOB, safe='')}"
                f"/job_uid/{quote(job_uid, safe='')}/unit/{quote(str(unit), safe='')}")

    async def delete_group(self, job_uid: str, unit: str) -> None:
        url = self.group_url(job_uid, unit)
        try:
            async with self.session.delete(url, timeout=self.timeout) as response:
                if response.status >= 400 and response.status != 404:
                    raise MetricsError(f"Pushgateway DELETE {url}: HTTP {response.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise MetricsError(f"Pushgateway DELETE {url}: {exc}") from exc

    async def groups(self) -> list[dict[str, str]]:
        """Grouping labels of every group the Pushgateway holds."""
        url = f"{self.base_url}/api/v1/metrics"
        try:
            async with self.session.get(url, timeout=self.timeout) as response:
                payload = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise MetricsError(f"Pushgateway {url}: {exc}") from exc
        return [dict(group.get("labels") or {}) for group in payload.get("data") or []]

    async def delete_job_groups(self, job_uid: str) -> int:
        """Delete every group of one job (all its units); returns how many."""
        doomed = [g for g in await self.groups() if g.get("job") == PUSH_JOB and g.get("job_uid") == job_uid]
        for group in doomed:
            await self.delete_group(job_uid, group.get("unit", ""))
        if doomed:
            logger.debug("deleted %d Pushgateway group(s) of job %s", len(doomed), job_uid)
        return len(doomed)
