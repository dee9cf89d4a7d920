"""Prometheus result parsing, and the async clients against a local aiohttp server."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import aiohttp
from aiohttp import web

from qtune.operator.prom import (
    MetricsError,
    PrometheusClient,
    PushgatewayClient,
    job_query,
    results_from_vector,
)
from qtune.runner.metrics import PUSH_JOB

UID = "u-1"


def _sample(name: str, value: str, trial: str = "0", **labels: str) -> dict[str, Any]:
    metric = {"__name__": name, "job": "qtune_trial", "job_uid": UID, "trial": trial, "instance": "", **labels}
    return {"metric": metric, "value": [1700000000.123, value]}


VECTOR = [
    _sample("qtune_trial_status", "1"),
    _sample("qtune_trial_accuracy", "0.9633333333333334"),
    _sample("qtune_trial_latency_p50_ms", "0.21", batch_size="1"),
    _sample("qtune_trial_latency_p50_ms", "2.5", batch_size="32"),
    _sample("qtune_trial_latency_p90_ms", "0.3", batch_size="1"),
    _sample("qtune_trial_model_size_bytes", "123456"),
    _sample("qtune_trial_duration_seconds", "1.5", phase="quantize"),
    _sample("qtune_trial_duration_seconds", "4.25", phase="total"),
    _sample("qtune_trial_status", "0", trial="1"),
    _sample("qtune_trial_accuracy", "NaN", trial="1"),
    _sample("qtune_trial_accuracy", "0.5", trial="2"),  # no status series: not a complete result
    _sample("qtune_trial_status", "1", trial="baseline"),
]


def test_results_from_vector() -> None:
    results = results_from_vector(VECTOR)
    assert set(results) == {"0", "1", "baseline"}
    assert results["0"] == {
        "status": "succeeded", "accuracy": 0.9633333333333334,
        "latency_ms": {"1": 0.21, "32": 2.5}, "latency_p90_ms": {"1": 0.3},
        "model_size_bytes": 123456, "timings": {"quantize": 1.5, "total": 4.25},
    }
    assert results["1"]["status"] == "failed" and math.isnan(results["1"]["accuracy"])


def test_push_job_matches_the_runner() -> None:
    from qtune.operator import prom

    assert prom.PUSH_JOB == PUSH_JOB


def test_query_escapes_label_values() -> None:
    assert job_query('a"b') == '{__name__=~"qtune_trial_.+",job="qtune_trial",job_uid="a\\"b"}'


def test_group_url() -> None:
    client = PushgatewayClient("http://pgw:9091/", None)  # type: ignore[arg-type]
    assert client.group_url("u/1", 3) == "http://pgw:9091/metrics/job/qtune_trial/job_uid/u%2F1/trial/3"


async def _with_server(handler_map: dict[tuple[str, str], Any], body: Any) -> Any:
    app = web.Application()
    for (method, path), handler in handler_map.items():
        app.router.add_route(method, path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as session:
            return await body(f"http://127.0.0.1:{port}", session)
    finally:
        await runner.cleanup()


def test_clients_against_a_local_server() -> None:
    groups = [{"labels": {"job": "qtune_trial", "job_uid": UID, "trial": "0"}},
              {"labels": {"job": "qtune_trial", "job_uid": UID, "trial": "baseline"}},
              {"labels": {"job": "qtune_trial", "job_uid": "other", "trial": "0"}},
              {"labels": {"job": "node", "job_uid": UID}}]
    deleted: list[str] = []
    queries: list[str] = []

    async def query(request: web.Request) -> web.Response:
        form = await request.post()
        queries.append(str(form["query"]))
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": VECTOR}})

    async def metrics(request: web.Request) -> web.Response:
        return web.json_response({"status": "success", "data": groups})

    async def delete(request: web.Request) -> web.Response:
        deleted.append(request.path)
        return web.Response(status=202)

    async def body(url: str, session: aiohttp.ClientSession) -> Any:
        results = await PrometheusClient(url, session).job_results(UID)
        count = await PushgatewayClient(url, session).delete_job_groups(UID)
        return results, count

    results, count = asyncio.run(_with_server({
        ("POST", "/api/v1/query"): query, ("GET", "/api/v1/metrics"): metrics,
        ("DELETE", "/metrics/job/{tail:.*}"): delete}, body))
    assert results["0"]["status"] == "succeeded"
    assert queries == [job_query(UID)]
    assert count == 2
    assert deleted == [f"/metrics/job/{PUSH_JOB}/job_uid/{UID}/trial/0",
                       f"/metrics/job/{PUSH_JOB}/job_uid/{UID}/trial/baseline"]


def test_prometheus_errors_are_metrics_errors() -> None:
    async def bad(request: web.Request) -> web.Response:
        return web.json_response({"status": "error", "errorType": "bad_data", "error": "parse error"}, status=400)

    async def body(url: str, session: aiohttp.ClientSession) -> Any:
        try:
            await PrometheusClient(url, session).query("up{")
        except MetricsError as exc:
            return str(exc)
        return None

    message = asyncio.run(_with_server({("POST", "/api/v1/query"): bad}, body))
    assert message and "bad_data" in message

    async def unreachable() -> str:
        async with aiohttp.ClientSession() as session:
            try:
                await PrometheusClient("http://127.0.0.1:9", session, timeout=2).query("up")
            except MetricsError as exc:
                return str(exc)
        return ""

    assert "Prometheus query failed" in asyncio.run(unreachable())
