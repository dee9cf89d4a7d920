"""The results gateway (issue 20): a real gateway (aiohttp server) in front of the real Pushgateway. The runner's
own push goes through with its unit's credential; other units', other jobs', other attempts' credentials, extra
labels, base64 forms, missing tokens and unit deletes are refused and nothing reaches the Pushgateway; reads need
a token; the operator's client lists and deletes (junk siblings included) through it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.error
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from aiohttp import web
from pushgateway_proc import needs_pushgateway, real_pushgateway, results_gateway
from yarl import URL

from qtune import protocol
from qtune.operator import gateway as gw
from qtune.operator.prom import MetricsError, PushgatewayClient
from qtune.runner import metrics
from qtune.runner.metrics import push_result

pytestmark = needs_pushgateway

KEY = "operator-signing-key"
READ_TOKEN = "prometheus-read-token"
UID = "0b6c7f5e-8d1a-4c2e-9f00-123456789abc"
OTHER = "11111111-2222-3333-4444-555555555555"
TRIAL = {"trial": 3, "status": "succeeded", "config_key": "0123456789abcdef0123456789abcdef", "accuracy": 0.96,
         "model_size_bytes": 1234, "model_path": "/workspace/jobs/x/trials/trial-3/model.int8.onnx"}
BODY = b"qtune_result_accuracy 0.5\n"
OPERATOR = protocol.gateway_operator_token(KEY)
ROOT = Path(__file__).resolve().parents[2]


def _secret(uid: str = UID, unit: str = "trial-3", attempt: int = 2) -> str:
    return protocol.derive_unit_secret(KEY, uid, unit, attempt)


def _auth(method: str = "PUT", body: bytes = BODY, uid: str = UID, unit: str = "trial-3", attempt: int = 2,
          claimed: int | None = None) -> dict[str, str]:
    token = protocol.push_token(_secret(uid, unit, attempt), method, body)
    return {"Authorization": f"Bearer {attempt if claimed is None else claimed}:{token}"}


def _group(uid: str = UID, unit: str = "trial-3") -> str:
    return f"/metrics/job/qtune_result/job_uid/{uid}/unit/{unit}"


Body = Callable[[str, str, aiohttp.ClientSession], Awaitable[Any]]


def _through_gateway(body: Body, **config: Any) -> Any:
    """Run `body(gateway url, pushgateway url, session)` with a real Pushgateway behind a real gateway."""
    with real_pushgateway() as upstream:
        async def run() -> Any:
            front = gw.ResultsGateway(gw.GatewayConfig(upstream=upstream, signing_key=KEY, read_token=READ_TOKEN,
                                                       **config))
            runner = web.AppRunner(front.app())
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            try:
                async with aiohttp.ClientSession() as session:
                    return await body(f"http://127.0.0.1:{port}", upstream, session)
            finally:
                await runner.cleanup()

        return asyncio.run(run())


async def _groups(url: str, session: aiohttp.ClientSession, want: int | None = None) -> list[dict[str, str]]:
    """The Pushgateway's groups read directly (it applies writes asynchronously: wait for `want` of them)."""
    deadline = time.monotonic() + 5
    while True:
        groups = await PushgatewayClient(url, session).groups()
        if want is None or len(groups) == want or time.monotonic() > deadline:
            return groups
        await asyncio.sleep(0.05)


async def _settled(url: str, session: aiohttp.ClientSession) -> list[dict[str, str]]:
    await asyncio.sleep(0.3)  # long enough for a write that got through to show
    return await _groups(url, session)


def test_the_runners_push_with_its_unit_credential_reaches_the_pushgateway() -> None:
    async def body(front: str, upstream: str, session: aiohttp.ClientSession) -> Any:
        signature = await asyncio.to_thread(push_result, front, UID, 3, TRIAL, _secret(), attempts=1, attempt=2)
        groups = await _groups(upstream, session, want=1)
        async with session.get(f"{upstream}/metrics") as answer:
            return signature, groups, await answer.text()

    signature, groups, exposition = _through_gateway(body)
    assert groups == [{"job": "qtune_result", "job_uid": UID, "unit": "trial-3"}]
    assert signature and f'signature="{signature}"' in exposition and "qtune_result_accuracy{" in exposition


def test_the_runner_takes_its_attempt_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(metrics.ATTEMPT_ENV, "2")
    monkeypatch.setenv(metrics.SECRET_ENV, _secret())

    async def body(front: str, upstream: str, session: aiohttp.ClientSession) -> Any:
        await asyncio.to_thread(push_result, front, UID, 3, TRIAL, attempts=1)
        return await _groups(upstream, session, want=1)

    assert len(_through_gateway(body)) == 1


@pytest.mark.parametrize("secret,attempt,uid,unit", [
    (_secret(attempt=1), 2, UID, 3),               # the secret of another attempt than the one claimed
    (_secret(), 1, UID, 3),                        # the right secret, another attempt claimed
    (_secret(unit="trial-4"), 2, UID, 3),          # another unit's secret
    (_secret(uid=OTHER), 2, UID, 3),               # another job's secret
    (_secret(), 2, OTHER, 3),                      # this unit's secret, pushed to another job's group
    (_secret(), 2, UID, "baseline"),               # ... to another unit's group
])
def test_a_push_with_another_units_credential_is_refused(secret: str, attempt: int, uid: str, unit: Any) -> None:
    async def body(front: str, upstream: str, session: aiohttp.ClientSession) -> Any:
        with pytest.raises(urllib.error.HTTPError) as refused:
            await asyncio.to_thread(push_result, front, uid, unit, TRIAL, secret, attempts=1, attempt=attempt)
        return refused.value.code, await _settled(upstream, session)

    assert _through_gateway(body) == (403, [])


@pytest.mark.parametrize("method,path,headers,status", [
    ("PUT", _group(), {}, 401),                                              # no token
    ("PUT", _group(), {"Authorization": "Basic dTpw"}, 401),                 # not a bearer token
    ("PUT", _group() + "/x/1", _auth(), 403),                                # an extra label segment
    ("PUT", _group() + "/batch_size/8", _auth(), 403),
    ("PUT", f"/metrics/job/qtune_result/job_uid/{UID}/unit@base64/dHJpYWwtMw==", _auth(), 403),  # base64 form
    ("PUT", f"/metrics/job/qtune_result/job_uid/{UID}/unit/trial%2D3", _auth(), 403),            # percent escape
    ("PUT", f"/metrics/job/other/job_uid/{UID}/unit/trial-3", _auth(), 403),  # another job label
    ("PUT", f"/metrics/job/qtune_result/unit/trial-3/job_uid/{UID}", _auth(), 403),  # labels in another order
    ("POST", _group(), _auth("PUT"), 403),                                   # a credential of another method
    ("PUT", _group(), _auth(body=b"qtune_result_accuracy 0.99\n"), 403),     # of another body
    ("DELETE", _group(), _auth("DELETE", b""), 403),                         # units never delete
    ("PUT", _group(), {"Authorization": f"Bearer {READ_TOKEN}"}, 403),       # the reader token writes nothing
    ("PUT", _group(), {"Authorization": f"Bearer {OPERATOR}"}, 403),         # the operator token only deletes
    ("PUT", "/api/v1/admin/wipe", {"Authorization": f"Bearer {OPERATOR}"}, 404),
])
def test_writes_other_than_a_units_own_push_are_refused(method: str, path: str, headers: dict[str, str],
                                                        status: int) -> None:
    async def body(front: str, upstream: str, session: aiohttp.ClientSession) -> Any:
        await session.put(upstream + _group(OTHER), data=BODY)  # a bystander's group the wipe would take
        async with session.request(method, URL(front + path, encoded=True), data=BODY if method != "DELETE" else None,
                                   headers=headers) as answer:
            return answer.status, await _settled(upstream, session)

    found, groups = _through_gateway(body)
    assert found == status
    assert groups == [{"job": "qtune_result", "job_uid": OTHER, "unit": "trial-3"}]


def test_a_body_over_the_cap_is_refused_before_it_is_checked() -> None:
    big = b"# " + b"x" * 2048 + b"\n" + BODY

    async def body(front: str, upstream: str, session: aiohttp.ClientSession) -> Any:
        async with session.put(front + _group(), data=big, headers=_auth(body=big)) as answer:
            return answer.status, await _settled(upstream, session)

    assert _through_gateway(body, max_body_bytes=1024) == (413, [])


@pytest.mark.parametrize("size,status", [(8 * 1024, 200), (40 * 1024, 413)])
def test_a_body_in_pieces_is_read_whole(size: int, status: int) -> None:
    whole = b"# " + b"x" * size + b"\n" + BODY

    async def pieces() -> Any:
        for start in range(0, len(whole), 1000):
            yield whole[start:start + 1000]
            await asyncio.sleep(0.001)

    async def body(front: str, upstream: str, session: aiohttp.ClientSession) -> Any:
        async with session.put(front + _group(), data=pieces(), headers=_auth(body=whole)) as answer:
            return answer.status, len(await _groups(upstream, session, want=1 if status == 200 else None))

    assert _through_gateway(body, max_body_bytes=32 * 1024) == (status, int(status == 200))


def test_reads_need_a_token_and_the_listing_the_operators() -> None:
    async def body(front: str, upstream: str, session: aiohttp.ClientSession) -> Any:
        await session.put(upstream + _group(), data=BODY)
        await _groups(upstream, session, want=1)
        out = {}
        for path, token in [("/metrics", None), ("/metrics", "wrong"), ("/metrics", READ_TOKEN),
                            ("/metrics", OPERATOR), ("/api/v1/metrics", None), ("/api/v1/metrics", READ_TOKEN),
                            ("/api/v1/metrics", OPERATOR), ("/api/v1/status", OPERATOR), ("/-/ready", OPERATOR)]:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            async with session.get(front + path, headers=headers) as answer:
                out[path, token] = (answer.status, await answer.text())
        return out

    out = _through_gateway(body)
    assert {key: status for key, (status, _) in out.items()} == {
        ("/metrics", None): 401, ("/metrics", "wrong"): 403, ("/metrics", READ_TOKEN): 200,
        ("/metrics", OPERATOR): 200, ("/api/v1/metrics", None): 401, ("/api/v1/metrics", READ_TOKEN): 403,
        ("/api/v1/metrics", OPERATOR): 200, ("/api/v1/status", OPERATOR): 404, ("/-/ready", OPERATOR): 404}
    assert f'job_uid="{UID}"' in out["/metrics", READ_TOKEN][1] and UID in out["/api/v1/metrics", OPERATOR][1]
    assert UID not in out["/metrics", "wrong"][1] + out["/api/v1/metrics", READ_TOKEN][1]


async def _capped_read(front: str, session: aiohttp.ClientSession) -> Any:
    async with session.get(front + "/api/v1/metrics", headers={"Authorization": f"Bearer {OPERATOR}"}) as answer:
        try:
            return answer.status, len(await answer.read())
        except aiohttp.ClientPayloadError:
            return answer.status, "cut"


def test_a_read_over_the_cap_is_refused() -> None:
    async def body(front: str, upstream: str, session: aiohttp.ClientSession) -> Any:
        await session.put(upstream + _group(), data=BODY)
        await _groups(upstream, session, want=1)
        return await _capped_read(front, session)

    assert _through_gateway(body, max_read_bytes=100)[0] == 502


def test_a_streamed_read_over_the_cap_is_cut() -> None:
    async def flood(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(64):
            await response.write(b"x" * 1024)
        await response.write_eof()
        return response

    async def run() -> Any:
        upstream = web.Application()
        upstream.router.add_get("/api/v1/metrics", flood)
        runners = [web.AppRunner(upstream), web.AppRunner(gw.ResultsGateway(gw.GatewayConfig(
            upstream="http://127.0.0.1:1", signing_key=KEY, max_read_bytes=8 * 1024)).app())]
        ports = []
        for runner in runners:
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        runners[1].app[gw.GATEWAY].upstream = f"http://127.0.0.1:{ports[0]}"
        try:
            async with aiohttp.ClientSession() as session:
                return await _capped_read(f"http://127.0.0.1:{ports[1]}", session)
        finally:
            for runner in runners:
                await runner.cleanup()

    assert asyncio.run(run()) == (200, "cut")


def test_the_operator_lists_and_deletes_every_group_of_a_job_through_the_gateway() -> None:
    async def body(front: str, upstream: str, session: aiohttp.ClientSession) -> Any:
        for path in ("", "/x/1", "/y@base64/="):  # the genuine group and junk pushed beside it
            await session.put(upstream + _group() + path, data=BODY)
        await session.put(upstream + _group(OTHER), data=BODY)
        await _groups(upstream, session, want=4)
        with pytest.raises(MetricsError):
            await PushgatewayClient(front, session).delete_job_groups(UID)  # no token
        count = await PushgatewayClient.of_operator(front, session, KEY).delete_job_groups(UID)  # main.py's
        return count, await _groups(upstream, session, want=1)

    count, left = _through_gateway(body)
    assert count == 3
    assert left == [{"job": "qtune_result", "job_uid": OTHER, "unit": "trial-3"}]


def test_the_operator_token_deletes_only_result_groups() -> None:
    async def body(front: str, upstream: str, session: aiohttp.ClientSession) -> Any:
        await session.put(upstream + "/metrics/job/node/instance/a", data=BODY)
        await _groups(upstream, session, want=1)
        async with session.delete(front + "/metrics/job/node/instance/a",
                                  headers={"Authorization": f"Bearer {OPERATOR}"}) as answer:
            return answer.status, await _settled(upstream, session)

    status, left = _through_gateway(body)
    assert status == 403 and len(left) == 1


def test_health_needs_no_token_and_counts_refusals_and_accepted_writes() -> None:
    async def body(front: str, upstream: str, session: aiohttp.ClientSession) -> Any:
        await session.put(front + _group(), data=BODY)
        async with session.put(front + _group(), data=BODY, headers=_auth()) as pushed:
            assert pushed.status == 200, await pushed.text()
        async with session.delete(front + _group(), headers={"Authorization": f"Bearer {OPERATOR}"}) as deleted:
            assert deleted.status == 202, await deleted.text()
        async with session.get(front + "/healthz") as answer:
            return answer.status, await answer.json()

    assert _through_gateway(body) == (200, {"status": "ok", "refused": {"401": 1},
                                            "forwarded": {"PUT": 1, "DELETE": 1}})


def test_the_gateway_refuses_to_start_without_the_signing_key() -> None:
    with pytest.raises(ValueError, match="QTUNE_SIGNING_KEY"):
        gw.GatewayConfig(upstream="http://pgw:9091", signing_key="")


@pytest.mark.parametrize("path", ["/metrics/job/qtune_result/job_uid/../unit/x", "/metrics/job//unit/x",
                                  "/metrics/job/qtune_result/job/again", "/metrics/job"])
def test_paths_the_pushgateway_could_read_otherwise_are_refused(path: str) -> None:
    with pytest.raises(gw.Refused):
        gw.split_group_path(path)


def test_a_plain_pushgateway_ignores_the_credential() -> None:
    with real_pushgateway() as upstream:
        push_result(upstream, UID, 3, TRIAL, _secret(), attempts=1, attempt=2)
        deadline = time.monotonic() + 5
        while UID not in requests.get(f"{upstream}/api/v1/metrics", timeout=5).text:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_the_qtune_results_gateway_command_serves() -> None:
    """`qtune results-gateway` as the chart runs it: the key from the environment, a push through it accepted."""
    with real_pushgateway() as upstream, results_gateway(upstream, KEY) as front:
        push_result(front, UID, 3, TRIAL, _secret(), attempts=1, attempt=2)
        assert requests.get(f"{front}/api/v1/metrics", timeout=5).status_code == 401
        deadline = time.monotonic() + 5  # the Pushgateway may apply a write after answering it
        while UID not in requests.get(f"{front}/api/v1/metrics", timeout=5,
                                      headers={"Authorization": f"Bearer {OPERATOR}"}).text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    env = {k: v for k, v in os.environ.items() if k != "QTUNE_SIGNING_KEY"}
    unkeyed = subprocess.run([sys.executable, "-m", "qtune.cli.main", "results-gateway", "--upstream=http://x:1"],
                             env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
                             check=False)
    assert unkeyed.returncode == 1 and "QTUNE_SIGNING_KEY" in unkeyed.stderr
