"""benchmarks/operator_fanout.py: its fake runner is the real runner (signed results the operator
accepts), and its checks of the scale run (trials recorded once, dispatch latency pairing, audit
counting) find what they must."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qtune import protocol
from qtune.operator.layout import JobRef
from qtune.operator.podstatus import PodSummary
from qtune.operator.results import ACCEPT, BAD_SIGNATURE, Observed, judge
from qtune.tuning import codec
from qtune.tuning.config import TuneConfig
from qtune.tuning.history import Baseline, Confirmation, History, TrialRecord

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "operator_fanout.py"
_spec = importlib.util.spec_from_file_location("operator_fanout", SCRIPT)
assert _spec and _spec.loader
bench = importlib.util.module_from_spec(_spec)
sys.modules["operator_fanout"] = bench  # dataclasses look their module up
_spec.loader.exec_module(bench)

KEY, UID = "bench-key", "job-uid-1"


class Gateway:
    """Keeps every pushed body by path (a Pushgateway stand-in)."""

    def __init__(self) -> None:
        self.pushed: dict[str, bytes] = {}
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
                gateway.pushed[self.path] = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    g = Gateway()
    yield g
    g.server.shutdown()
    g.server.server_close()


def _decode(body: bytes) -> tuple[protocol.Result, str | None]:
    pairs = [({**s.labels, "__name__": s.name, "job": protocol.PUSH_JOB, "job_uid": UID, "unit": "u"}, s.value)
             for family in text_string_to_metric_families(body.decode()) for s in family.samples]
    groups = protocol.group_samples(pairs)
    assert len(groups) == 1
    return protocol.decode_result(next(iter(groups.values())))


def _run_fake(tmp_path: Path, gateway: Gateway, unit: str, *args: str) -> subprocess.CompletedProcess[str]:
    job = tmp_path / "job.json"
    job.write_text(json.dumps(bench.job("bench-000", 5, 2)))
    env = {**os.environ, "QTUNE_RESULT_SECRET": protocol.derive_unit_secret(KEY, UID, unit, 0),
           "QTUNE_TERMINATION_LOG": str(tmp_path / "termination-log")}
    return subprocess.run([sys.executable, str(SCRIPT), "fake-runner", *args, "--job", str(job), "--workspace",
                           str(tmp_path / "ws"), "--pushgateway", gateway.url, "--job-uid", UID],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


def _accepted(unit: str, result: protocol.Result, signature: str | None, key: str = KEY) -> str:
    job = JobRef("bench-000", "ns", UID)
    pod = PodSummary(name=f"bench-000-{unit}", namespace="ns", job_uid=UID, unit=unit, attempt=0,
                     phase="Succeeded", owner_uids=(UID,))
    return judge(job, Observed(unit, result, signature), pod, key)


def test_fake_trial_and_confirm_results_are_signed_and_accepted_by_the_operator(tmp_path: Path,
                                                                               gateway: Gateway) -> None:
    space = bench.fake_space()
    config = space.default_config()
    (tmp_path / "config.json").write_text(json.dumps(codec.dump(config)))
    done = _run_fake(tmp_path, gateway, "trial-3", "trial", "--index", "3", "--config", str(tmp_path / "config.json"))
    assert done.returncode == 0, done.stderr
    body = gateway.pushed[f"/metrics/job/{protocol.PUSH_JOB}/job_uid/{UID}/unit/trial-3"]
    result, signature = _decode(body)
    assert isinstance(result, protocol.TrialResult) and result.trial == 3 and result.status == "succeeded"
    assert result.config_key == config.key() and set(result.speed) == {"1", "32"}
    assert _accepted("trial-3", result, signature) == ACCEPT
    assert _accepted("trial-3", result, signature, key="another-key") == BAD_SIGNATURE

    (tmp_path / "configs.json").write_text(json.dumps({"3": codec.dump(config), "4": codec.dump(config)}))
    done = _run_fake(tmp_path, gateway, "confirm", "confirm", "--candidates", "3",
                     "--config", str(tmp_path / "configs.json"))
    assert done.returncode == 0, done.stderr
    result, signature = _decode(gateway.pushed[f"/metrics/job/{protocol.PUSH_JOB}/job_uid/{UID}/unit/confirm"])
    assert isinstance(result, protocol.ConfirmResult) and result.candidates == [3]  # the runner's --candidates
    assert _accepted("confirm", result, signature) == ACCEPT


def test_fake_runner_fails_like_the_runner(tmp_path: Path, gateway: Gateway) -> None:
    """A missing --config is the runner's own error path: exit 1, termination message, nothing faked."""
    done = _run_fake(tmp_path, gateway, "trial-0", "trial", "--index", "0")
    assert done.returncode == protocol.EXIT_JOB_UNUSABLE
    assert (tmp_path / "termination-log").read_text().startswith("InvalidSpec: --config is required")


def test_the_fake_space_has_enough_configs_for_the_largest_run() -> None:
    from qtune.tuning.strategies.exhaustive import ExhaustiveStrategy

    space = bench.fake_space()
    configs = ExhaustiveStrategy().propose(space, History("j"), 10_000)
    assert len(configs) == bench.MAX_TRIALS >= 100


def pod(uid: str, unit: str, created: float, attempt: int = 0) -> Any:
    return bench.PodSeen(f"{uid}-{unit}-{attempt}", uid, unit, attempt, created)


def test_dispatch_latency_pairs_results_with_the_pods_they_let_start() -> None:
    results = {("a", "trial-0"): 10.0, ("a", "trial-1"): 10.1, ("a", "trial-2"): 12.0, ("a", "trial-3"): 12.5,
               ("a", "baseline"): 1.0, ("b", "trial-0"): 10.0}
    pods = [pod("a", "trial-0", 2.0), pod("a", "trial-1", 2.1),  # after the baseline: not paired
            pod("a", "trial-2", 10.5), pod("a", "trial-3", 10.7),
            pod("a", "trial-3", 11.0, attempt=1),  # a retry: not a dispatch
            pod("a", "confirm", 13.0),  # waits for all: paired with the last result (12.5), not 12.0
            pod("b", "trial-1", 10.3), pod("b", "cleanup", 20.0)]  # cleanup: not a dispatch
    assert sorted(round(x, 3) for x in bench.dispatch_latencies(results, pods)) == [0.3, 0.5, 0.5, 0.6]
    paired = {pod.unit: key for key, _, pod in bench.dispatch_pairs(results, pods) if pod.job_uid == "a"}
    assert paired == {"trial-2": ("a", "trial-0"), "trial-3": ("a", "trial-1"), "confirm": ("a", "trial-3")}


def test_dispatch_latency_allows_the_poll_period_of_slack() -> None:
    results = {("a", "trial-0"): 10.05}
    assert [round(x, 3) for x in bench.dispatch_latencies(results, [pod("a", "trial-2", 10.0)], slack=0.1)] == [-0.05]
    assert bench.dispatch_latencies(results, [pod("a", "trial-2", 10.0)], slack=0.0) == []


def _history(indices: list[int], status: str = "succeeded", confirmed: bool = True) -> History:
    history = History("j", baseline=Baseline(accuracy=0.9))
    history.trials = [TrialRecord(i, f"k{i}", TuneConfig("static", "QDQ", {}), status=status) for i in indices]
    history.confirmation = Confirmation(status="succeeded") if confirmed else None
    return history


def test_check_job_accepts_each_trial_once_and_reports_retries() -> None:
    pods = [pod("a", f"trial-{i}", float(i)) for i in range(3)] + [pod("a", "trial-1", 5.0, attempt=1)]
    check = bench.check_job("j", "Succeeded", _history([0, 1, 2]), 3, pods, confirm=True)
    assert check.violations == [] and check.recorded == 3 and check.retries == {1: 2}


@pytest.mark.parametrize(("state", "indices", "status", "confirmed", "pod_indices", "expected"), [
    ("Succeeded", [0, 1, 1], "succeeded", True, [0, 1], "more than once: [1]"),
    ("Succeeded", [0, 2], "succeeded", True, [0, 2], "missing [1]"),
    ("Succeeded", [0, 1, 2], "failed", True, [0, 1, 2], "not succeeded"),
    ("Succeeded", [0, 1, 2], "succeeded", False, [0, 1, 2], "confirmation"),
    ("Succeeded", [0, 1, 2], "succeeded", True, [0, 1], "without a pod: [2]"),
    ("Succeeded", [0, 1, 2], "succeeded", True, [0, 1, 2, 3], "not recorded: [3]"),
    ("Failed", [0, 1, 2], "succeeded", True, [0, 1, 2], "state Failed"),
])
def test_check_job_finds_violations(state: str, indices: list[int], status: str, confirmed: bool,
                                    pod_indices: list[int], expected: str) -> None:
    pods = [pod("a", f"trial-{i}", float(i)) for i in pod_indices]
    check = bench.check_job("j", state, _history(indices, status, confirmed), 3, pods, confirm=True)
    assert any(expected in v for v in check.violations), check.violations


def test_check_job_without_history() -> None:
    assert "no history ConfigMap" in bench.check_job("j", "Succeeded", None, 3, [], confirm=True).violations


def _event(audit_id: str, verb: str, resource: str | None, stage: str = "ResponseComplete",
           user: str = "qtune-operator", at: str = "2026-12-02T01:00:00.250000Z", **ref: Any) -> str:
    event: dict[str, Any] = {"auditID": audit_id, "stage": stage, "verb": verb, "user": {"username": user},
                             "requestURI": "/healthz?x=1", "requestReceivedTimestamp": at, "stageTimestamp": at,
                             "responseStatus": {"code": 201 if verb == "create" else 200}}
    if resource:
        event["objectRef"] = {"resource": resource, **ref}
    return json.dumps(event)


def test_audit_counts_one_per_request_of_the_operator_user_only() -> None:
    lines = [
        _event("1", "watch", "pods", stage="ResponseStarted"), _event("1", "watch", "pods"),  # one request
        _event("2", "create", "pods", namespace="ns", name="p0"),
        _event("3", "patch", "quantizationjobs", subresource="status"),
        _event("4", "get", None),
        _event("5", "list", "pods", user="qtune-admin"),
        _event("6", "list", "pods", at="2026-12-02T00:59:59Z"),  # before the operator started
        "{not json",
    ]
    since = bench._timestamp("2026-12-02T01:00:00Z")
    requests = bench.read_audit(lines, "qtune-operator", since=since)
    kinds = sorted(bench.request_kind(e) for e in requests.values())
    assert kinds == [("create", "pods"), ("get", "(non-resource)"), ("patch", "quantizationjobs/status"),
                     ("watch", "pods")]
    assert bench.created_pods(requests, "ns") == {"p0": since + 0.25}
    assert bench.created_pods(requests, "other") == {}


def test_operator_settings_show_what_the_operator_reads_from_env() -> None:
    from dataclasses import fields

    from qtune.operator.config import OperatorConfig

    settings = dict(item.split("=", 1) for item in bench.operator_settings({"QTUNE_POLL_INTERVAL": "2"}))
    assert settings["poll_interval"] == "2.0*"
    names = {f.name for f in fields(OperatorConfig)}
    assert set(settings) <= names and not any(v.endswith("*") for k, v in settings.items() if k != "poll_interval")


def test_the_operator_split_counts_requests_made_at_once_once() -> None:
    """The history stored while the next pod is created: two requests, one stretch in the API server."""
    def request(name: str, begin: float, end: float) -> dict[str, Any]:
        def stamp(t: float) -> str:
            return f"2026-12-02T01:00:{t:09.6f}Z"
        return {"stage": "ResponseComplete", "verb": "update", "objectRef": {"name": name},
                "requestReceivedTimestamp": stamp(begin), "stageTimestamp": stamp(end)}

    requests = {"a": request("job-history", 10.1, 10.2), "b": request("job-trial-1", 10.12, 10.25),
                "c": request("job-trial-1-key", 10.3, 10.35), "d": request("other-history", 10.1, 10.2)}
    start = bench._timestamp("2026-12-02T01:00:10Z")
    [split] = bench.operator_split(requests, [("job", start, start + 0.25)])
    assert split.requests == 2 and abs(split.wake - 0.1) < 1e-6
    assert abs(split.api - 0.15) < 1e-6 and abs(split.between) < 1e-6
