"""Prometheus result parsing, and the async clients against a local aiohttp server."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web

from qtune import protocol
from qtune.operator.prom import MetricsError, PrometheusClient, PushgatewayClient, job_query
from qtune.runner.metrics import PUSH_JOB

UID = "u-1"
RESULT = protocol.TrialResult(trial=0, status="succeeded", accuracy=0.96, model_size_bytes=123456)


def _vector(unit: str, result: protocol.Result, uid: str = UID) -> list[dict[str, Any]]:
    return [{"metric": {"__name__": s.name, **s.labels, "job": PUSH_JOB, "job_uid": uid, "unit": unit,
                        "instance": ""}, "value": [1700000000.123, repr(s.value)]}
            for s in protocol.encode_result(result, "sig")]


VECTOR = _vector("trial-0", RESULT) + _vector("baseline", protocol.BaselineResult(accuracy=0.97)) + \
    _vector("trial-0", RESULT, uid="other")


def test_push_job_matches_the_runner() -> None:
    from qtune.operator import prom

    assert prom.PUSH_JOB == PUSH_JOB == protocol.PUSH_JOB


def test_query_escapes_label_values() -> None:
    assert job_query('a"b') == '{__name__=~"qtune_result_.+",job="qtune_result",job_uid="a\\"b"}'


def test_group_url() -> None:
    client = PushgatewayClient("http://pgw:9091/", None)  # type: ignore[arg-type]
    assert client.group_url("u/1", "trial-3") == \
        "http://pgw:9091/metrics/job/qtune_result/job_uid@base64/dS8x/unit/trial-3"  # a slash: base64url


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
    groups = [{"labels": {"job": PUSH_JOB, "job_uid": UID, "unit": "trial-0"}},
              {"labels": {"job": PUSH_JOB, "job_uid": UID, "unit": "baseline"}},
              {"labels": {"job": PUSH_JOB, "job_uid": "other", "unit": "trial-0"}},
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
    assert set(results) == {"trial-0", "baseline"}
    assert results["trial-0"].result == RESULT and results["trial-0"].signature == "sig"
    assert queries == [job_query(UID)]
    assert count == 2
    assert deleted == [f"/metrics/job/{PUSH_JOB}/job_uid/{UID}/unit/trial-0",
                       f"/metrics/job/{PUSH_JOB}/job_uid/{UID}/unit/baseline"]


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
