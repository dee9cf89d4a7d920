"""Async clients of the Prometheus HTTP API (trial results) and of the Pushgateway (clean-up).

Trial pods push their result under the Pushgateway grouping key {job_uid, trial} (job
`qtune_trial`, see qtune/runner/metrics.py); Prometheus scrapes the Pushgateway with
honor_labels. The operator reads a job's results with one instant query, copies them into the
history and status, and deletes the group. Nothing here blocks the event loop (aiohttp).
"""

from __future__ import annotations

import logging
import math
from typing import Any
from urllib.parse import quote

import aiohttp

logger = logging.getLogger(__name__)

PUSH_JOB = "qtune_trial"
"""Must equal qtune.runner.metrics.PUSH_JOB (not imported: the runner package pulls numpy in)."""
METRIC_PREFIX = "qtune_trial_"


class MetricsError(RuntimeError):
    """Prometheus or the Pushgateway could not be reached or answered an error."""


def label_value(value: str) -> str:
    """A PromQL string literal body: backslashes and double quotes escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def job_query(job_uid: str) -> str:
    return f'{{__name__=~"{METRIC_PREFIX}.+",job="{PUSH_JOB}",job_uid="{label_value(job_uid)}"}}'


def _number(sample: Any) -> float | None:
    try:
        value = float(sample[1])
    except (TypeError, ValueError, IndexError):
        return None
    return value


ALL_QUERY = f'{{__name__=~"{METRIC_PREFIX}.+",job="{PUSH_JOB}"}}'
"""Every job's queryable results at once (what the operator-wide poller asks)."""


def results_from_vector(vector: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Prometheus instant-vector samples of ONE job -> {trial label: result dict as the runner writes it}.

    A trial counts only when its `qtune_trial_status` series is present (a Pushgateway group is
    replaced atomically, so the other series of the push come with it)."""
    return results_by_job(vector, any_job=True).get("", {})


def results_by_job(vector: list[dict[str, Any]], any_job: bool = False) -> dict[str, dict[str, dict[str, Any]]]:
    """Samples -> {job_uid: {trial: result}} (with any_job, every sample counts under "")."""
    by_job: dict[str, dict[str, dict[str, Any]]] = {}
    for sample in vector:
        metric = sample.get("metric") or {}
        trial = metric.get("trial")
        name = metric.get("__name__", "")
        value = _number(sample.get("value"))
        uid = "" if any_job else metric.get("job_uid")
        if trial is None or value is None or uid is None:
            continue
        result = by_job.setdefault(uid, {}).setdefault(
            trial, {"latency_ms": {}, "latency_p90_ms": {}, "timings": {}})
        if name == "qtune_trial_status":
            result["status"] = "succeeded" if value >= 1 else "failed"
        elif name == "qtune_trial_accuracy":
            result["accuracy"] = value
        elif name == "qtune_trial_latency_p50_ms" and "batch_size" in metric:
            result["latency_ms"][metric["batch_size"]] = value
        elif name == "qtune_trial_latency_p90_ms" and "batch_size" in metric:
            result["latency_p90_ms"][metric["batch_size"]] = value
        elif name == "qtune_trial_model_size_bytes":
            result["model_size_bytes"] = int(value) if math.isfinite(value) else None
        elif name == "qtune_trial_duration_seconds" and "phase" in metric:
            result["timings"][metric["phase"]] = value
    return {uid: {trial: r for trial, r in trials.items() if "status" in r} for uid, trials in by_job.items()}


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

    async def job_results(self, job_uid: str) -> dict[str, dict[str, Any]]:
        """Every result of the job currently queryable, by trial label ("0", "1", ..., "baseline")."""
        return results_from_vector(await self.query(job_query(job_uid)))

    async def all_results(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Every job's queryable results: {job_uid: {trial: result}}."""
        return results_by_job(await self.query(ALL_QUERY))


class ResultsPoller:
    """One operator-wide query every `interval` seconds: a job whose trial result just became
    queryable is woken at once (its loop records the result even before the pod is reported
    finished). One query for all jobs keeps the load on Prometheus independent of their number."""

    def __init__(self, prometheus: PrometheusClient, interval: float, wakeups: dict[str, Any]) -> None:
        self.prometheus = prometheus
        self.interval = interval
        self.wakeups = wakeups
        self.snapshot: dict[str, dict[str, dict[str, Any]]] = {}
        self.taken_at: float | None = None

    def results(self, job_uid: str) -> dict[str, dict[str, Any]]:
        return self.snapshot.get(job_uid, {})

    async def poll_once(self) -> None:
        import time

        snapshot = await self.prometheus.all_results()
        for uid, trials in snapshot.items():
            if set(trials) - set(self.snapshot.get(uid, {})):
                event = self.wakeups.get(uid)
                if event is not None:
                    event.set()
        self.snapshot = snapshot
        self.taken_at = time.time()

    async def run(self) -> None:
        import asyncio

        while True:
            try:
                await self.poll_once()
            except MetricsError as exc:
                logger.warning("results poller: %s", exc)
            await asyncio.sleep(self.interval)


class PushgatewayClient:
    def __init__(self, base_url: str, session: aiohttp.ClientSession, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout)

    def group_url(self, job_uid: str, trial: int | str) -> str:
        return (f"{self.base_url}/metrics/job/{quote(PUSH_JOB, safe='')}"
                f"/job_uid/{quote(job_uid, safe='')}/trial/{quote(str(trial), safe='')}")

    async def delete_group(self, job_uid: str, trial: int | str) -> None:
        url = self.group_url(job_uid, trial)
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
        """Delete every group of one job (its trials and the baseline); returns how many."""
        doomed = [g for g in await self.groups() if g.get("job") == PUSH_JOB and g.get("job_uid") == job_uid]
        for group in doomed:
            await self.delete_group(job_uid, group.get("trial", ""))
        if doomed:
            logger.debug("deleted %d Pushgateway group(s) of job %s", len(doomed), job_uid)
        return len(doomed)
