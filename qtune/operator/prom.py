"""Async clients of the Prometheus HTTP API (unit results) and of the Pushgateway (clean-up).

Pods push their result under the Pushgateway grouping key {job_uid, unit} (job `qtune_result`;
the series are qtune.protocol's metric table, see qtune/runner/metrics.py); Prometheus scrapes the
Pushgateway with honor_labels. The operator reads results with instant queries naming only the jobs
that wait for one, decodes every pushed group (its FULL grouping-label set) on its own, off the event
loop and within a byte and series cap, ignores groups with any other grouping label (anyone who reaches
the Pushgateway may push them), believes a result only with proof of origin
(qtune/operator/results.py), records it and deletes every group of its unit. The Pushgateway copy
is the early wake-up; a finished pod's termination message is the copy no other tenant can touch
(qtune/operator/pods.py prefers it).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp

from qtune import protocol
from qtune.operator.results import Observed

logger = logging.getLogger(__name__)

PUSH_JOB = protocol.PUSH_JOB
METRIC_PREFIX = protocol.METRIC_PREFIX
MAX_BYTES = 8 * 1024 * 1024
"""Default cap of a Prometheus answer (a larger one is a MetricsError, counted, never parsed)."""
MAX_SERIES = 100_000
"""Default cap of the series in one answer."""
LISTING_MAX_BYTES = 64 * 1024 * 1024
"""Cap of the Pushgateway's listing of every group (it holds every tenant's groups and their series)."""
REPORTED_LIMIT = 100_000
"""Bad groups remembered so that each is logged once (beyond it the memory starts again)."""
UNDECODABLE, FOREIGN_LABELS = "Undecodable", "ForeignGroupLabels"


class MetricsError(RuntimeError):
    """Prometheus or the Pushgateway could not be reached or answered an error."""


class TooLarge(MetricsError):
    """An answer over the byte or series cap: refused, not parsed."""


def label_value(value: str) -> str:
    """A PromQL string literal body: backslashes and double quotes escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def job_query(job_uid: str) -> str:
    return f'{{__name__=~"{METRIC_PREFIX}.+",job="{PUSH_JOB}",job_uid="{label_value(job_uid)}"}}'


_REGEX_META = re.compile(r"[\\.+*?()|\[\]{}^$]")


def jobs_query(job_uids: Iterable[str]) -> str:
    """The results of these jobs only: `job_uid=~"uid1|uid2"` (each uid a regex literal)."""
    alternatives = "|".join(_REGEX_META.sub(r"\\\g<0>", uid) for uid in sorted(set(job_uids)))
    return f'{{__name__=~"{METRIC_PREFIX}.+",job="{PUSH_JOB}",job_uid=~"{label_value(alternatives)}"}}'


def _value(sample: dict[str, Any]) -> float | None:
    try:
        return float(sample["value"][1])
    except (KeyError, TypeError, ValueError, IndexError):
        return None


@dataclass
class Decoded:
    """The results in a Prometheus answer, and the groups refused (grouping labels -> why)."""

    results: dict[str, dict[str, Observed]] = field(default_factory=dict)
    rejected: dict[protocol.GroupKey, str] = field(default_factory=dict)


def decode_vector(vector: list[dict[str, Any]]) -> Decoded:
    """Prometheus instant-vector samples -> results by job and unit. Each group (its full grouping-label set)
    decodes alone: one with other grouping labels than a result's, or that does not decode, is refused and
    leaves every other group as it is."""
    pairs = [(dict(s.get("metric") or {}), v) for s in vector if isinstance(s, dict) and (v := _value(s)) is not None]
    out = Decoded()
    for key, samples in protocol.group_series(pairs, METRIC_PREFIX, protocol.SERIES_LABELS).items():
        unit_key = protocol.group_unit(key)
        if unit_key is None:
            out.rejected[key] = f"{FOREIGN_LABELS}: grouping labels other than job, job_uid, unit"
            continue
        uid, unit = unit_key
        try:
            result, signature = protocol.decode_result(samples)
        except protocol.ProtocolError as exc:
            out.rejected[key] = f"{UNDECODABLE}: {exc}"
            continue
        out.results.setdefault(uid, {})[unit] = Observed(unit, result, signature)
    return out


def results_by_job(vector: list[dict[str, Any]]) -> dict[str, dict[str, Observed]]:
    """{job_uid: {unit: Observed}} of the groups that decode (decode_vector)."""
    return decode_vector(vector).results


def parse_vector(body: bytes, max_series: int = MAX_SERIES) -> list[dict[str, Any]]:
    """The samples of a Prometheus instant-query answer (JSON); MetricsError for an error or another type."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise MetricsError(f"Prometheus answered no JSON: {type(exc).__name__}") from None
    if not isinstance(payload, dict) or payload.get("status") != "success":
        payload = payload if isinstance(payload, dict) else {}
        raise MetricsError(f"Prometheus query failed: {payload.get('errorType')}: {payload.get('error')}")
    data = payload.get("data") or {}
    if not isinstance(data, dict) or data.get("resultType") != "vector":
        kind = data.get("resultType") if isinstance(data, dict) else type(data).__name__
        raise MetricsError(f"Prometheus returned {kind!r}, expected a vector")
    result = data.get("result") or []
    if not isinstance(result, list):
        raise MetricsError("Prometheus returned no list of samples")
    if len(result) > max_series:
        raise TooLarge(f"Prometheus answer too large: {len(result)} series, more than {max_series}")
    return result


async def read_capped(response: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The body, or TooLarge as soon as it exceeds `limit` bytes (never held whole beyond it)."""
    if response.content_length is not None and response.content_length > limit:
        raise TooLarge(f"{what} too large: {response.content_length} bytes, more than {limit}")
    body = bytearray()
    async for chunk in response.content.iter_chunked(256 * 1024):
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"{what} too large: more than {limit} bytes")
    return bytes(body)


class PrometheusClient:
    """Instant queries against /api/v1/query: answers read within `max_bytes` and `max_series`, parsed and
    decoded in a worker thread (the event loop also serves Kopf and /healthz)."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession, timeout: float = 10.0,
                 max_bytes: int = MAX_BYTES, max_series: int = MAX_SERIES, rejected: Any | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.max_bytes = max_bytes
        self.max_series = max_series
        self.rejected = rejected
        """The operator's rejected-results counter (labels `reason`): each bad group counted once."""
        self.reported: set[protocol.GroupKey] = set()

    async def _body(self, promql: str) -> bytes:
        url = f"{self.base_url}/api/v1/query"
        try:
            async with self.session.post(url, data={"query": promql}, timeout=self.timeout) as response:
                return await read_capped(response, self.max_bytes, "Prometheus answer")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise MetricsError(f"Prometheus query failed ({url}): {exc}") from exc

    async def query(self, promql: str) -> list[dict[str, Any]]:
        return await asyncio.to_thread(parse_vector, await self._body(promql), self.max_series)

    async def decoded(self, promql: str) -> Decoded:
        body = await self._body(promql)
        decoded = await asyncio.to_thread(lambda: decode_vector(parse_vector(body, self.max_series)))
        self._report(decoded.rejected)
        return decoded

    def _report(self, rejected: dict[protocol.GroupKey, str]) -> None:
        """Log and count each refused group once (not on every poll)."""
        for key, why in rejected.items():
            if key in self.reported:
                continue
            if len(self.reported) >= REPORTED_LIMIT:
                self.reported.clear()
            self.reported.add(key)
            labels = ",".join(f"{k}={v!r}" for k, v in key)
            logger.warning("Pushgateway group {%s} ignored: %s", labels[:500], why[:500])
            if self.rejected is not None:
                self.rejected.labels(reason=why.split(":", 1)[0]).inc()

    async def job_results(self, job_uid: str) -> dict[str, Observed]:
        """Every result of the job currently queryable, by unit id."""
        return (await self.decoded(job_query(job_uid))).results.get(job_uid, {})

    async def results_of(self, job_uids: Iterable[str]) -> dict[str, dict[str, Observed]]:
        """The queryable results of these jobs: {job_uid: {unit: Observed}} (nothing asked for none)."""
        uids = sorted(set(job_uids))
        if not uids:
            return {}
        return (await self.decoded(jobs_query(uids))).results


class ResultsPoller:
    """One operator-wide query every `interval` seconds, of the jobs whose units wait for a result (`watch`):
    a job whose result just became queryable is woken at once (its loop records it even before the pod is
    reported finished). No query while no job waits. One answer too large for all of them is asked again job
    by job, so a job whose groups are flooded fails alone."""

    WAIT_TTL = 120.0
    """A job not said to wait again within this long (its loop ended) is no longer queried."""

    def __init__(self, prometheus: PrometheusClient, interval: float, wakeups: dict[str, Any],
                 errors: Any | None = None, clock: Any = time.monotonic) -> None:
        self.prometheus = prometheus
        self.interval = interval
        self.wakeups = wakeups
        """job uid -> its loop's wake-up event (the jobs this operator runs)."""
        self.errors = errors
        """The operator's error counter (labels `kind`), counted once per failed poll."""
        self.clock = clock
        self.waiting: dict[str, float] = {}
        """job uid -> when its loop last said one of its units waits for a result."""
        self.snapshot: dict[str, dict[str, Observed]] = {}
        self.taken_at: float | None = None
        self.last_error: str | None = None
        self.failures = 0

    def results(self, job_uid: str) -> dict[str, Observed]:
        return self.snapshot.get(job_uid, {})

    def watch(self, job_uid: str, waiting: bool) -> None:
        """A job's loop says whether any of its units runs or waits for its result."""
        if waiting:
            self.waiting[job_uid] = self.clock()
        else:
            self.waiting.pop(job_uid, None)

    def waiting_uids(self) -> list[str]:
        now = self.clock()
        for uid, since in list(self.waiting.items()):
            if uid not in self.wakeups or now - since > self.WAIT_TTL:
                del self.waiting[uid]
        return sorted(self.waiting)

    async def poll_once(self) -> None:
        uids = self.waiting_uids()
        snapshot = await self._gather(uids) if uids else {}
        for uid, trials in snapshot.items():
            if set(trials) - set(self.snapshot.get(uid, {})):
                event = self.wakeups.get(uid)
                if event is not None:
                    event.set()
        self.snapshot = snapshot
        self.taken_at = time.time()

    async def _gather(self, uids: list[str]) -> dict[str, dict[str, Observed]]:
        try:
            return await self.prometheus.results_of(uids)
        except TooLarge:
            if len(uids) == 1:
                raise
        out: dict[str, dict[str, Observed]] = {}
        for uid in uids:
            try:
                out.update(await self.prometheus.results_of([uid]))
            except TooLarge as exc:
                self._failed("prometheus_too_large", f"job {uid}: {exc}")
                logger.warning("results poller: job %s: %s", uid, exc)
        return out

    async def run(self) -> None:
        """Poll until cancelled: no error ends the loop (a bug is logged with its traceback and counted)."""
        while True:
            try:
                await self.poll_once()
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except MetricsError as exc:
                self._failed("prometheus_too_large" if isinstance(exc, TooLarge) else "prometheus", str(exc))
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


_PLAIN_VALUE = re.compile(r"[A-Za-z0-9._~-]+")


def group_path(labels: dict[str, str]) -> str:
    """The Pushgateway URL path of a group with exactly these grouping labels: `job` first, then the others;
    a value that is empty or not URL-plain in base64url form (`name@base64/...`), as the Pushgateway reads it."""
    parts = []
    for name in ["job", *sorted(k for k in labels if k != "job")]:
        value = str(labels.get(name, ""))
        if _PLAIN_VALUE.fullmatch(value):
            parts.append(f"{quote(name, safe='')}/{value}")
        else:
            encoded = base64.urlsafe_b64encode(value.encode()).decode() or "="
            parts.append(f"{quote(name, safe='')}@base64/{encoded}")
    return "/metrics/" + "/".join(parts)


def _parse_groups(body: bytes) -> list[dict[str, str]]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise MetricsError(f"Pushgateway listing is no JSON: {type(exc).__name__}") from None
    data = payload.get("data") if isinstance(payload, dict) else None
    return [{str(k): str(v) for k, v in (group.get("labels") or {}).items()}
            for group in data or [] if isinstance(group, dict)]


class PushgatewayClient:
    """Deletes result groups by their full grouping labels (whatever labels a pod pushed them with). With
    `token` (the operator's results-gateway token, qtune.wire.gateway_operator_token) every request carries
    `Authorization: Bearer <token>`: the results gateway requires it, a plain Pushgateway ignores it."""

    LISTING_TTL = 5.0
    """A unit's siblings are looked for in a listing at most this old (one GET serves many deletes)."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession, timeout: float = 10.0,
                 max_bytes: int = LISTING_MAX_BYTES, clock: Any = time.monotonic, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.max_bytes = max_bytes
        self.clock = clock
        self._listing: tuple[float, list[dict[str, str]]] | None = None
        self._listing_lock = asyncio.Lock()

    @classmethod
    def of_operator(cls, base_url: str, session: aiohttp.ClientSession, signing_key: str) -> PushgatewayClient:
        """The operator's client: it carries the results-gateway token derived from the operator's key."""
        return cls(base_url, session, token=protocol.gateway_operator_token(signing_key) if signing_key else None)

    def group_url(self, job_uid: str, unit: str) -> str:
        return self.base_url + group_path({"job": PUSH_JOB, "job_uid": job_uid, "unit": str(unit)})

    async def delete_labels(self, labels: dict[str, str]) -> bool:
        """Delete the group with exactly these grouping labels; False when the Pushgateway had none (404)."""
        url = self.base_url + group_path(labels)
        try:
            async with self.session.delete(url, timeout=self.timeout, headers=self.headers) as response:
                if response.status == 404:
                    return False
                if response.status >= 400:
                    raise MetricsError(f"Pushgateway DELETE {url}: HTTP {response.status}")
                return True
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise MetricsError(f"Pushgateway DELETE {url}: {exc}") from exc

    async def delete_group(self, job_uid: str, unit: str) -> bool:
        """Delete the result group {job_uid, unit} itself (not its siblings: `delete_unit_groups`)."""
        return await self.delete_labels({"job": PUSH_JOB, "job_uid": job_uid, "unit": str(unit)})

    async def groups(self) -> list[dict[str, str]]:
        """Grouping labels of every group the Pushgateway holds (read within `max_bytes`, parsed off the loop)."""
        url = f"{self.base_url}/api/v1/metrics"
        try:
            async with self.session.get(url, timeout=self.timeout, headers=self.headers) as response:
                if response.status >= 400:
                    raise MetricsError(f"Pushgateway GET {url}: HTTP {response.status}")
                body = await read_capped(response, self.max_bytes, "Pushgateway listing")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise MetricsError(f"Pushgateway {url}: {exc}") from exc
        groups = await asyncio.to_thread(_parse_groups, body)
        self._listing = (self.clock(), groups)
        return groups

    async def _recent_groups(self) -> list[dict[str, str]]:
        async with self._listing_lock:
            if self._listing is None or self.clock() - self._listing[0] > self.LISTING_TTL:
                return await self.groups()
            return self._listing[1]

    async def delete_unit_groups(self, job_uid: str, unit: str) -> int:
        """Delete the unit's result group and every other group pushed for the same job uid and unit whatever
        their other labels (found in a listing at most LISTING_TTL old); returns how many were deleted."""
        own = {"job": PUSH_JOB, "job_uid": job_uid, "unit": str(unit)}
        count = int(await self.delete_labels(own))
        try:
            listed = await self._recent_groups()
        except MetricsError as exc:  # e.g. a flooded Pushgateway: the job's end and the sweep try again
            logger.warning("groups pushed beside %s of job %s not looked for: %s", unit, job_uid, exc)
            return count
        doomed = [g for g in listed if g.get("job") == PUSH_JOB and g.get("job_uid") == job_uid and
                  g.get("unit") == str(unit) and g != own]
        return count + sum([await self.delete_labels(group) for group in doomed])

    async def delete_job_groups(self, job_uid: str) -> int:
        """Delete every group of one job, by its full grouping labels (all its units, and any group pushed
        beside them); returns how many were deleted."""
        doomed = [g for g in await self.groups() if g.get("job") == PUSH_JOB and g.get("job_uid") == job_uid]
        deleted = sum([await self.delete_labels(group) for group in doomed])
        if doomed:
            logger.debug("deleted %d Pushgateway group(s) of job %s", deleted, job_uid)
        return deleted
