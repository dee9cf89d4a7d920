"""The result channel against hostile tenants (issue 20): groups pushed beside a result, every group of a
job deleted, the poller asking only about waiting jobs within a byte cap, and the signed result in the
pod's termination message. Real aiohttp servers (and the real Pushgateway when it is installed)."""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from aiohttp import web
from pushgateway_proc import needs_pushgateway, real_pushgateway
from test_prom import _with_server

from qtune import protocol
from qtune.operator import prom
from qtune.operator.metrics import OperatorMetrics
from qtune.operator.podstatus import PodSummary
from qtune.operator.prom import PrometheusClient, PushgatewayClient, ResultsPoller, TooLarge, decode_vector
from qtune.operator.results import terminated_result
from qtune.runner.metrics import termination_result

UID = "0b6c7f5e-8d1a-4c2e-9f00-123456789abc"
OTHER = "11111111-2222-3333-4444-555555555555"
SECRET = "unit-secret"


def _speed(batch: int, seed: int = 0) -> protocol.SpeedMeasurement:
    """Measured-looking figures (full float precision: they compress as badly as real ones)."""
    r = random.Random(batch * 1000 + seed).random
    return protocol.SpeedMeasurement(batch_size=batch, p50_ms=r() * 10, p90_ms=r() * 10, fp32_p50_ms=r() * 20,
                                     fp32_p90_ms=r() * 20, speedup=1 + r(), low=1 + r(), high=2 + r(), rounds=40,
                                     runs_per_window=12, threads=4, seconds=r() * 100, contended_rounds=3,
                                     exclusive_cpus=True)


TRIAL = protocol.TrialResult(
    trial=3, status="succeeded", config_key="0123456789abcdef0123456789abcdef", accuracy=0.9612345678,
    speed={str(b): _speed(b) for b in (1, 8, 32)}, model_size_bytes=12_345_678,
    timings={"calibrate": 12.5, "quantize": 3.25, "evaluate": 40.125, "benchmark": 90.5},
    model_path="/workspace/jobs/digits-7f3c/trials/trial-3/model.int8.onnx",
    notes=["ops kept in fp32: Conv_12, MatMul_40 (accuracy)", "per-channel weights"],
    peak_rss_bytes={"calibration": 987_654_321, "total": 1_234_567_890}, model_sha256="ab" * 32)
BASELINE = protocol.BaselineResult(accuracy=0.97, metric="top1", latency_ms={"1": 2.5, "8": 11.0, "32": 40.0},
                                   latency_p90_ms={"1": 2.9, "8": 12.0, "32": 44.0}, model_size_bytes=48_000_000,
                                   seconds=312.5, peak_rss_bytes={"calibration": 1_000_000_000, "total": 1_500_000})
CONFIRM = protocol.ConfirmResult(candidates=[3, 5, 7], seconds=300.25,
                                 speed={str(t): {str(b): _speed(b, t) for b in (1, 8, 32)} for t in (3, 5, 7)})
"""The default confirmation: 3 candidates (spec.tuning.confirmCandidates) at 3 batch sizes."""


def _series(result: protocol.Result, signature: str | None, uid: str = UID, unit: str = "trial-3",
            **extra: str) -> list[dict[str, Any]]:
    """A pushed group as Prometheus (honor_labels) serves it: grouping labels on every series."""
    return [{"metric": {"__name__": s.name, **s.labels, "job": protocol.PUSH_JOB, "job_uid": uid, "unit": unit,
                        **extra}, "value": [1700000000.5, repr(s.value)]}
            for s in protocol.encode_result(result, signature)]


# ------------------------------------------------------------------------------------- sibling groups
def test_a_sibling_group_does_not_spoil_the_genuine_result() -> None:
    signature = protocol.sign_result(UID, "trial-3", TRIAL, SECRET)
    poison = protocol.TrialResult(trial=3, status="succeeded", accuracy=0.1)
    vector = (_series(TRIAL, signature)
              + _series(poison, None, x="1")                                         # a whole sibling result
              + [{"metric": {"__name__": "qtune_result_accuracy", "job": protocol.PUSH_JOB, "job_uid": UID,
                             "unit": "trial-3", "x": "2"}, "value": [0, "0.5"]}]   # one series: malformed
              + _series(TRIAL, signature, instance="pod-7"))                        # `instance` is not ours
    decoded = decode_vector(vector)
    observed = decoded.results[UID]["trial-3"]
    assert observed.result == TRIAL and observed.signature == signature
    assert protocol.verify_result(UID, "trial-3", observed.result, SECRET, observed.signature)
    assert len(decoded.rejected) == 3
    assert all(why.startswith(prom.FOREIGN_LABELS) for why in decoded.rejected.values())
    assert (("job", protocol.PUSH_JOB), ("job_uid", UID), ("unit", "trial-3"), ("x", "1")) in decoded.rejected


def test_an_undecodable_group_is_refused_alone() -> None:
    bad = [{"metric": {"__name__": protocol.INFO_METRIC, "kind": "bogus", "job": protocol.PUSH_JOB,
                       "job_uid": OTHER, "unit": "trial-0"}, "value": [0, "1"]}]
    decoded = decode_vector(_series(TRIAL, "sig") + bad)
    assert set(decoded.results) == {UID}
    (why,) = decoded.rejected.values()
    assert why.startswith(prom.UNDECODABLE)


def test_each_bad_group_is_logged_and_counted_once(caplog: pytest.LogCaptureFixture) -> None:
    metrics = OperatorMetrics()
    vector = _series(TRIAL, "sig") + _series(TRIAL, "sig", x="1")

    async def query(request: web.Request) -> web.Response:
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": vector}})

    async def body(url: str, session: aiohttp.ClientSession) -> Any:
        client = PrometheusClient(url, session, rejected=metrics.results_rejected)
        return [await client.job_results(UID) for _ in range(5)]

    with caplog.at_level(logging.WARNING, logger="qtune.operator.prom"):
        answers = asyncio.run(_with_server({("POST", "/api/v1/query"): query}, body))
    assert all(answer["trial-3"].result == TRIAL for answer in answers)
    assert [r for r in caplog.records if "ignored" in r.getMessage()].__len__() == 1
    assert metrics.registry.get_sample_value("qtune_operator_results_rejected_total",
                                             {"reason": prom.FOREIGN_LABELS}) == 1


# ------------------------------------------------------------------------------------- the poller
class QueryLog:
    """A Prometheus that answers each job's results, or a too-large answer for chosen queries."""

    def __init__(self, vector: list[dict[str, Any]]) -> None:
        self.vector = vector
        self.queries: list[str] = []
        self.too_large: set[str] = set()
        self.stream = False

    async def handle(self, request: web.Request) -> web.StreamResponse:
        query = str((await request.post())["query"])
        self.queries.append(query)
        answer = {"status": "success", "data": {"resultType": "vector", "result": [
            s for s in self.vector if f'"{s["metric"]["job_uid"]}' in query or f'|{s["metric"]["job_uid"]}' in query]}}
        if any(marker in query for marker in self.too_large):
            answer["padding"] = "x" * (2 * 1024 * 1024)
        if not self.stream:
            return web.json_response(answer)
        response = web.StreamResponse()  # chunked: no Content-Length to refuse it by
        await response.prepare(request)
        await response.write(web.json_response(answer).body)  # type: ignore[arg-type]
        await response.write_eof()
        return response


def _poll(log: QueryLog, steps: Any, max_bytes: int = prom.MAX_BYTES, max_series: int = prom.MAX_SERIES) -> Any:
    metrics = OperatorMetrics()

    async def body(url: str, session: aiohttp.ClientSession) -> Any:
        client = PrometheusClient(url, session, max_bytes=max_bytes, max_series=max_series)
        now = [0.0]
        poller = ResultsPoller(client, 0.25, {UID: asyncio.Event(), OTHER: asyncio.Event()}, metrics.errors,
                               clock=lambda: now[0])
        return await steps(poller, now)

    return asyncio.run(_with_server({("POST", "/api/v1/query"): log.handle}, body)), metrics


def test_the_poller_asks_only_about_jobs_that_wait() -> None:
    log = QueryLog(_series(TRIAL, "sig") + _series(TRIAL, "sig", uid=OTHER))

    async def steps(poller: ResultsPoller, now: list[float]) -> Any:
        await poller.poll_once()
        assert log.queries == [] and poller.snapshot == {}, "no query while no job waits"
        poller.watch(UID, True)
        await poller.poll_once()
        assert poller.wakeups[UID].is_set() and not poller.wakeups[OTHER].is_set()
        assert set(poller.snapshot) == {UID}
        poller.watch(UID, False)
        poller.watch(OTHER, True)
        now[0] += poller.WAIT_TTL + 1  # OTHER's loop said nothing since: it waits no more
        await poller.poll_once()
        poller.watch(OTHER, True)
        del poller.wakeups[OTHER]      # the job was deleted
        await poller.poll_once()
        return poller.snapshot

    snapshot, _ = _poll(log, steps)
    assert snapshot == {}
    assert len(log.queries) == 1 and UID in log.queries[0] and OTHER not in log.queries[0]
    assert log.queries[0] == prom.jobs_query([UID])


def test_the_query_names_every_waiting_job_as_a_regex_literal() -> None:
    query = prom.jobs_query([OTHER, UID, "a.b|c"])
    assert query.endswith(f'job_uid=~"{UID}|{OTHER}|a\\\\.b\\\\|c"}}'), query
    assert query.startswith('{__name__=~"qtune_result_.+",job="qtune_result",job_uid=~"')


@pytest.mark.parametrize("stream", [False, True])
def test_a_too_large_answer_is_a_counted_error_and_the_other_jobs_go_on(stream: bool) -> None:
    log = QueryLog(_series(TRIAL, "sig") + _series(TRIAL, "sig", uid=OTHER))
    log.stream = stream
    log.too_large = {f'"{OTHER}"', f'"{UID}|{OTHER}"', f'"{OTHER}|{UID}"'}  # OTHER's groups are flooded

    async def steps(poller: ResultsPoller, now: list[float]) -> Any:
        poller.watch(UID, True)
        poller.watch(OTHER, True)
        await poller.poll_once()
        return poller.snapshot

    snapshot, metrics = _poll(log, steps, max_bytes=1024 * 1024)
    assert set(snapshot) == {UID}, "the flooded job fails alone"
    assert metrics.registry.get_sample_value("qtune_operator_step_errors_total",
                                             {"kind": "prometheus_too_large"}) == 1


def test_too_many_series_is_too_large() -> None:
    log = QueryLog(_series(TRIAL, "sig"))

    async def steps(poller: ResultsPoller, now: list[float]) -> Any:
        with pytest.raises(TooLarge, match="series"):
            await poller.prometheus.job_results(UID)
        return None

    _poll(log, steps, max_series=3)


def test_answers_are_parsed_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    threads: list[str] = []
    real = prom.decode_vector

    def spy(vector: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(vector)

    monkeypatch.setattr(prom, "decode_vector", spy)
    log = QueryLog(_series(TRIAL, "sig"))

    async def steps(poller: ResultsPoller, now: list[float]) -> Any:
        return await poller.prometheus.job_results(UID)

    found, _ = _poll(log, steps)
    assert found["trial-3"].result == TRIAL
    assert threads and threads[0] != threading.main_thread().name


# ------------------------------------------------------------------------------------- deleting groups
GROUPS = [{"job": protocol.PUSH_JOB, "job_uid": UID, "unit": "trial-0"},
          {"job": protocol.PUSH_JOB, "job_uid": UID, "unit": "trial-0", "x": "1"},
          {"job": protocol.PUSH_JOB, "job_uid": UID, "unit": "trial-0", "y": ""},
          {"job": protocol.PUSH_JOB, "job_uid": UID, "unit": "trial-1", "z": "a/b"},
          {"job": protocol.PUSH_JOB, "job_uid": UID, "unit": "trial-2", "gone": "1"},
          {"job": protocol.PUSH_JOB, "job_uid": OTHER, "unit": "trial-0", "x": "1"},
          {"job": "node", "job_uid": UID}]


def _gateway(body: Any) -> list[str]:
    deleted: list[str] = []

    async def listing(request: web.Request) -> web.Response:
        return web.json_response({"status": "success", "data": [{"labels": g} for g in GROUPS]})

    async def delete(request: web.Request) -> web.Response:
        deleted.append(request.raw_path)
        return web.Response(status=404 if "/gone/" in request.raw_path else 202)

    asyncio.run(_with_server({("GET", "/api/v1/metrics"): listing, ("DELETE", "/metrics/{tail:.*}"): delete}, body))
    return deleted


def test_every_group_of_a_job_is_deleted_by_its_full_labels() -> None:
    counts: list[int] = []

    async def body(url: str, session: aiohttp.ClientSession) -> None:
        counts.append(await PushgatewayClient(url, session).delete_job_groups(UID))

    deleted = _gateway(body)
    base = f"/metrics/job/qtune_result/job_uid/{UID}"
    assert deleted == [f"{base}/unit/trial-0", f"{base}/unit/trial-0/x/1", f"{base}/unit/trial-0/y@base64/=",
                       f"{base}/unit/trial-1/z@base64/YS9i",
                       f"/metrics/job/qtune_result/gone/1/job_uid/{UID}/unit/trial-2"]  # labels after job: sorted
    assert counts == [4], "the 404 deleted nothing"


def test_a_recorded_unit_takes_its_sibling_groups_along() -> None:
    counts: list[int] = []

    async def body(url: str, session: aiohttp.ClientSession) -> None:
        counts.append(await PushgatewayClient(url, session).delete_unit_groups(UID, "trial-0"))

    deleted = _gateway(body)
    base = f"/metrics/job/qtune_result/job_uid/{UID}/unit/trial-0"
    assert deleted == [base, f"{base}/x/1", f"{base}/y@base64/="] and counts == [3]


@needs_pushgateway
def test_the_real_pushgateway_deletes_every_poisoned_group(tmp_path: Path) -> None:
    with real_pushgateway() as url:
        base = f"{url}/metrics/job/qtune_result/job_uid/{UID}/unit/trial-0"
        for path in ("", "/x/1", "/y@base64/=", "/z@base64/YS9i", "/batch_size/8"):
            requests.put(base + path, data=b"qtune_result_accuracy 0.5\n", timeout=5).raise_for_status()
        requests.put(f"{url}/metrics/job/qtune_result/job_uid/{OTHER}/unit/trial-0", timeout=5,
                     data=b"qtune_result_accuracy 0.9\n").raise_for_status()

        survivor = [{"job": "qtune_result", "job_uid": OTHER, "unit": "trial-0"}]

        async def run() -> tuple[int, list[dict[str, str]]]:
            async with aiohttp.ClientSession() as session:
                client = PushgatewayClient(url, session)
                while len(await client.groups()) < 6:  # the Pushgateway applies writes asynchronously (202)
                    await asyncio.sleep(0.05)
                count = await client.delete_job_groups(UID)
                for _ in range(100):
                    if (left := await client.groups()) == survivor:
                        break
                    await asyncio.sleep(0.05)
                return count, left

        count, left = asyncio.run(run())
        assert count == 5
        assert left == survivor


# ------------------------------------------------------------------------------------- termination message
@pytest.mark.parametrize("unit,result", [("trial-3", TRIAL), ("baseline", BASELINE), ("confirm", CONFIRM)])
def test_real_results_fit_in_the_termination_message_and_verify(unit: str, result: protocol.Result) -> None:
    signature = protocol.sign_result(UID, unit, result, SECRET)
    text = termination_result(unit, result, signature)
    assert text is not None and len(text.encode()) <= protocol.TERMINATION_LIMIT
    found = protocol.result_of_termination(text)
    assert found is not None and found[0] == unit and found[1] == result and found[2] == signature
    assert protocol.verify_result(UID, unit, found[1], SECRET, found[2])
    assert protocol.parse_termination(text)[0] is None, "never read as a failure's `Reason: message`"


def test_a_result_too_large_for_the_termination_message_is_left_to_the_push() -> None:
    noisy = TRIAL.model_copy(update={"notes": [f"{random.random()}" for _ in range(400)]})
    assert termination_result("trial-3", noisy, "sig") is None


def test_failure_messages_are_no_results() -> None:
    text = protocol.termination_message("OOMKilled", "over 2Gi")
    assert protocol.result_of_termination(text) is None
    assert protocol.parse_termination(text) == ("OOMKilled", "over 2Gi")
    with pytest.raises(protocol.ProtocolError):
        protocol.result_of_termination(protocol.RESULT_TAG + "not base64!")


def _pod(unit: str, message: str | None) -> PodSummary:
    return PodSummary(name=f"digits-{unit}", namespace="ml", job_uid=UID, unit=unit, attempt=0, phase="Succeeded",
                      message=message)


def test_a_pods_termination_result_is_its_own_units_only() -> None:
    text = termination_result("trial-3", TRIAL, "sig")
    observed = terminated_result(_pod("trial-3", text))
    assert observed is not None and observed.result == TRIAL and observed.signature == "sig"
    assert terminated_result(_pod("trial-4", text)) is None
    assert terminated_result(_pod("trial-3", protocol.RESULT_TAG + "eJzLSM3JyQcABiwCFQ==")) is None  # "hello"
    assert terminated_result(_pod("trial-3", "Completed")) is None


def test_the_runner_writes_its_signed_result_to_the_termination_log(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from qtune.runner import __main__ as runner

    log = tmp_path / "termination-log"
    monkeypatch.setenv("QTUNE_TERMINATION_LOG", str(log))
    runner._terminate_with_result("trial-3", TRIAL, "sig")
    found = protocol.result_of_termination(log.read_text())
    assert found == ("trial-3", TRIAL, "sig")


def test_a_unit_group_is_deleted_even_when_the_listing_fails() -> None:
    deleted: list[str] = []

    async def listing(request: web.Request) -> web.Response:
        return web.Response(status=500)

    async def delete(request: web.Request) -> web.Response:
        deleted.append(request.raw_path)
        return web.Response(status=202)

    async def body(url: str, session: aiohttp.ClientSession) -> int:
        return await PushgatewayClient(url, session).delete_unit_groups(UID, "trial-0")

    count = asyncio.run(_with_server({("GET", "/api/v1/metrics"): listing,
                                      ("DELETE", "/metrics/{tail:.*}"): delete}, body))
    assert count == 1 and deleted == [f"/metrics/job/qtune_result/job_uid/{UID}/unit/trial-0"]
