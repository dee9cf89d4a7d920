"""Three tenants share one operator on the test plane (real API server, Prometheus, Pushgateway, the
node agent running real trial pods). Two run the digits job; the third attacks, as a user who may
create jobs and pods in its own namespace and reach the Pushgateway:

* through the results gateway (the only way to the Pushgateway a pod of a cluster with the chart's
  NetworkPolicies has): pushes, deletes and listings of the other tenants' groups, all refused;
* directly on the Pushgateway (as if that NetworkPolicy were missing): 10,000 junk result groups, a
  series that makes the Pushgateway refuse every genuine result push (400), and sibling groups, malformed
  replacements and DELETEs of the other tenants' result groups all through their runs;
* a forged edit of its own job's history ConfigMap;
* a forged result pushed for its own running trial, signed with the unit Secret a pod of the tenant
  could mount;
* code of its own in a baseline pod: a decode bomb and a 40,000-op tuning space published to the
  operator.

The honest jobs must finish with the winner `qtune tune` finds locally, every trial recorded once; the
operator must never restart and stay under 300 MiB; every hostile job fails with a reason naming what
was refused, or has its forgery ignored. One run of all of it (module fixture), checked by the tests."""

from __future__ import annotations

import base64
import contextlib
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import opcluster
import pytest
import tenants
from clusterlib import wait_for
from kubernetes import client

from qtune import protocol
from qtune.operator import constants as c
from qtune.runner.metrics import push_result

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from pushgateway_proc import results_gateway  # noqa: E402

MAX_TRIALS = 4
FORGED_ACCURACY = 0.123456
JUNK_GROUPS = 10_000
RSS_LIMIT = 300 * 1024 * 1024
HONEST_TIMEOUT = 1200.0
HOSTILE_CODE = Path(__file__).with_name("hostile_code.py")


@dataclass
class TenantRun:
    operator: opcluster.OperatorProcess
    honest: dict[str, str]
    """namespace -> job uid of the honest jobs."""
    hostile_ns: str
    statuses: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    junk_pushed: int = 0
    clash_landed: bool = False
    gateway_answers: list[int] = field(default_factory=list)
    """HTTP status of each attack on another tenant's groups through the results gateway."""
    forged_pushes: int = 0
    poison_rounds: int = 0
    history_forged: bool = False
    peak_rss: int = 0
    local_best: str = ""


def _final(cluster: Any, ns: str, name: str, timeout: float) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def done() -> bool:
        seen.clear()
        seen.update(opcluster.job_status(cluster, ns, name))
        return seen.get("state") in ("Succeeded", "Failed")

    wait_for(done, timeout, f"job {ns}/{name} finished", detail=lambda: repr(seen), interval=1.0)
    return dict(seen)


def _history(cluster: Any, ns: str, name: str) -> list[dict[str, Any]]:
    from qtune.operator.store import decode_history
    from qtune.tuning import codec

    body = client.CoreV1Api(cluster.api_client()).read_namespaced_config_map(c.history_configmap(name), ns)
    history = decode_history({"data": body.data, "binaryData": body.binary_data})
    return [] if history is None else [codec.dump(t) for t in history.trials]


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _forge_history(cluster: Any, ns: str, name: str) -> bool:
    """Once trial 0 is recorded: set its accuracy to 0.99 in the stored document, the rest untouched."""
    core = client.CoreV1Api(cluster.api_client())
    key = c.HISTORY_KEY
    body = core.read_namespaced_config_map(c.history_configmap(name), ns)
    document = protocol.decode_document({"data": body.data, "binaryData": body.binary_data}, key)
    if not document or not document.get("trials"):
        return False
    document["trials"][0]["accuracy"] = 0.99
    plain, packed = protocol.encode_document(key, document)
    core.patch_namespaced_config_map(c.history_configmap(name), ns, {
        "data": {key: plain.get(key)}, "binaryData": {f"{key}.gz": packed.get(f"{key}.gz")}})
    return True


def _forge_push(cluster: Any, gateway: str, ns: str, name: str, uid: str, until: float) -> int:
    """Push a forged result for a running trial of the job, signed with that pod's own Secret, again and again
    until the trial is recorded (its pod and Secret deleted by the operator), so the forgery is the last word in
    the Pushgateway; a trial that ends before 6 pushes is replaced by the job's next one."""
    core = client.CoreV1Api(cluster.api_client())
    selector = f"{c.LABEL_JOB_UID}={uid},{c.LABEL_ROLE}=trial"
    pushes, target = 0, None
    while time.monotonic() < until:
        pods = {p.metadata.name: p for p in core.list_namespaced_pod(ns, label_selector=selector).items}
        if target is None:
            target = next((n for n, p in pods.items() if p.status.phase == "Running"), None)
        pod = pods.get(target) if target is not None else None
        if target is not None and pod is None:
            if pushes > 5:
                return pushes  # recorded, its pod deleted by the operator
            target = None
            continue
        if pod is not None:
            try:
                secret = core.read_namespaced_secret(c.unit_key(target), ns).data[c.SECRET_KEY]
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
                target = None
                continue
            unit = pod.metadata.labels[c.LABEL_UNIT]
            forged = tenants.forged_trial(protocol.unit_trial_index(unit) or 0, FORGED_ACCURACY)
            with contextlib.suppress(OSError):  # counted whether or not the Pushgateway took it
                push_result(gateway, uid, unit, forged, base64.b64decode(secret).decode(),
                            attempt=int(pod.metadata.labels[c.LABEL_ATTEMPT]), attempts=1)
            pushes += 1
        time.sleep(0.3)
    return pushes


def _hostile_workspace(cluster: Any, ns: str) -> None:
    folder = opcluster.prepare_workspace(cluster, ns)
    (folder / "hostile_code.py").write_text(HOSTILE_CODE.read_text())


def _hostile_manifest(name: str, metric: str) -> dict[str, Any]:
    manifest = opcluster.job_manifest(name, maxTrials=2, parallelTrials=1)
    manifest["spec"]["data"]["evaluation"]["metric"] = metric
    return manifest


@pytest.fixture(scope="module")
def run(cluster: Any, crds: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TenantRun]:
    if cluster.state_dir is None or not cluster.pushgateway_url:
        pytest.skip("needs the test plane's node agent and Pushgateway")
    tmp = tmp_path_factory.mktemp("tenants")
    ns_a, ns_b, ns_h = (cluster.create_namespace(prefix=f"qtune-{t}-") for t in ("a", "b", "hostile"))
    workspace = opcluster.prepare_workspace(cluster, ns_a)
    opcluster.prepare_workspace(cluster, ns_b)
    _hostile_workspace(cluster, ns_h)
    with results_gateway(str(cluster.pushgateway_url), opcluster.SIGNING_KEY) as gateway:
        operator = opcluster.OperatorProcess(cluster, [ns_a, ns_b, ns_h], tmp, "--pushgateway-url", gateway,
                                              "--sweep-interval", "5").start()
        try:
            yield _attack_and_run(cluster, operator, gateway, ns_a, ns_b, ns_h, workspace, tmp)
        finally:
            operator.stop()
            for ns in (ns_a, ns_b, ns_h):
                cluster.delete_namespace(ns)
            tenants.clear_results(str(cluster.pushgateway_url))  # the plane's Pushgateway serves the next tests


def _attack_and_run(cluster: Any, operator: opcluster.OperatorProcess, gateway: str, ns_a: str, ns_b: str,
                    ns_h: str, workspace: Path, tmp: Path) -> TenantRun:
    pushgateway = str(cluster.pushgateway_url)
    junk = tenants.push_junk_groups(pushgateway, JUNK_GROUPS)
    honest = {}
    for ns in (ns_a, ns_b):
        opcluster.create_job(cluster, ns, opcluster.job_manifest("digits", maxTrials=MAX_TRIALS))
        honest[ns] = opcluster.get_job(cluster, ns, "digits")["metadata"]["uid"]
    result = TenantRun(operator=operator, honest=honest, hostile_ns=ns_h, junk_pushed=junk)
    result.gateway_answers = tenants.through_the_gateway(gateway, list(honest.values()))
    opcluster.create_job(cluster, ns_h, opcluster.job_manifest("history-forger", maxTrials=6, parallelTrials=1))
    opcluster.create_job(cluster, ns_h, opcluster.job_manifest("push-forger", maxTrials=2, parallelTrials=1))
    opcluster.create_job(cluster, ns_h, _hostile_manifest("bomb", "hostile_code:Bomb"))
    opcluster.create_job(cluster, ns_h, _hostile_manifest("big-space", "hostile_code:BigSpace"))
    push_uid = opcluster.get_job(cluster, ns_h, "push-forger")["metadata"]["uid"]
    blocker = opcluster.job_manifest("blocker")  # fails InvalidSpec at once: a live uid the janitor is done with
    blocker["spec"]["workspace"]["persistentVolumeClaim"] = "no-such-claim"
    opcluster.create_job(cluster, ns_h, blocker)
    blocker_uid = opcluster.get_job(cluster, ns_h, "blocker")["metadata"]["uid"]

    with tenants.Poisoner(pushgateway, lambda: list(honest.values())) as poisoner, ThreadPoolExecutor(2) as pool:
        pushes = pool.submit(_forge_push, cluster, gateway, ns_h, "push-forger", push_uid, time.monotonic() + 600)
        forged = pool.submit(wait_for, lambda: _forge_history(cluster, ns_h, "history-forger"), 600,
                             "history-forger's trial 0 recorded", interval=0.5)
        result.forged_pushes = pushes.result()
        # from when it lands the Pushgateway refuses every genuine push: results reach the operator in termination
        # messages alone
        _final(cluster, ns_h, "blocker", 120)
        poisoner.clash_uid = blocker_uid
        forged.result()
        result.history_forged = True
        for ns in (ns_a, ns_b):
            result.statuses[(ns, "digits")] = _final(cluster, ns, "digits", HONEST_TIMEOUT)
        result.poison_rounds = poisoner.rounds
        result.clash_landed = poisoner.clash_landed_round is not None
    for name in ("history-forger", "push-forger", "bomb", "big-space"):
        result.statuses[(ns_h, name)] = _final(cluster, ns_h, name, 600)
    for ns in (ns_a, ns_b):
        result.histories[ns] = _history(cluster, ns, "digits")
    result.histories[ns_h] = _history(cluster, ns_h, "push-forger")
    result.peak_rss = _peak_rss(operator.proc.pid) if operator.proc else 0
    result.local_best, _ = opcluster.local_best(workspace, tmp, max_trials=MAX_TRIALS)
    return result


def test_the_attacks_ran(run: TenantRun) -> None:
    assert run.junk_pushed == JUNK_GROUPS
    assert run.clash_landed, "the series that blocks every genuine push never got into the Pushgateway"
    assert run.poison_rounds >= 3
    assert run.forged_pushes > 5
    assert run.history_forged


def test_the_results_gateway_refuses_every_attack_on_another_tenant(run: TenantRun) -> None:
    assert run.gateway_answers and all(status in (401, 403) for status in run.gateway_answers), run.gateway_answers


def test_honest_tenants_get_the_winner_they_get_alone(run: TenantRun) -> None:
    for ns in run.honest:
        status = run.statuses[(ns, "digits")]
        assert status["state"] == "Succeeded", status
        assert status["best"]["configKey"] == run.local_best, status["best"]


def test_every_honest_trial_is_recorded_once(cluster: Any, run: TenantRun) -> None:
    for ns in run.honest:
        history = run.histories[ns]
        assert [t["index"] for t in history] == list(range(MAX_TRIALS))
        assert all(t["status"] == "succeeded" and t["accuracy"] > 0.9 for t in history)
        runs = opcluster.pod_runs(cluster, ns)
        assert {p: n for p, n in runs.items() if p.startswith("digits-trial-")} == \
            {f"digits-trial-{i}": 1 for i in range(MAX_TRIALS)}, runs


def test_the_operator_never_restarted_and_stayed_small(run: TenantRun) -> None:
    assert run.operator.starts == 1 and run.operator.proc is not None and run.operator.proc.poll() is None
    assert run.peak_rss < RSS_LIMIT, f"operator peak RSS {run.peak_rss / 2**20:.0f} MiB"


def test_a_forged_history_edit_is_refused(run: TenantRun) -> None:
    status = run.statuses[(run.hostile_ns, "history-forger")]
    best = status.get("best") or {}
    assert best.get("accuracy") != 0.99
    assert all(t.get("accuracy") != 0.99 for t in status.get("recentTrials", [])), status
    assert status["state"] == "Failed" and status["reason"] == "HistoryRejected", status
    assert c.history_configmap("history-forger") in status["message"]


def test_a_forged_push_signed_with_a_mounted_secret_is_not_believed(run: TenantRun) -> None:
    status = run.statuses[(run.hostile_ns, "push-forger")]
    assert status["state"] == "Succeeded", status
    history = run.histories[run.hostile_ns]
    assert history and all(t["accuracy"] != FORGED_ACCURACY and t["config_key"] != "forged" for t in history)


def test_a_decode_bomb_fails_its_job_alone(run: TenantRun) -> None:
    status = run.statuses[(run.hostile_ns, "bomb")]
    assert status["state"] == "Failed" and status["reason"] == "PayloadTooLarge", status
    assert c.baseline_configmap("bomb") in status["message"]


def test_a_40000_op_space_fails_its_job_alone(run: TenantRun) -> None:
    status = run.statuses[(run.hostile_ns, "big-space")]
    assert status["state"] == "Failed" and status["reason"] == "PayloadTooLarge", status
    assert c.baseline_configmap("big-space") in status["message"]


def test_no_result_group_of_a_deleted_job_is_left(cluster: Any, run: TenantRun) -> None:
    """The poison included: once a job is deleted, every group under its uid goes (the sweep), whatever its extra
    labels; the attacker could push junk under a finished job's uid until then."""
    ns = sorted(run.honest)[0]
    uid = run.honest[ns]
    opcluster.custom(cluster).delete_namespaced_custom_object(opcluster.GROUP, opcluster.VERSION, ns,
                                                              opcluster.PLURAL, "digits")
    wait_for(lambda: not opcluster.pushgateway_groups(cluster, uid), 120,
             f"every Pushgateway group of deleted job {uid} swept",
             detail=lambda: repr(opcluster.pushgateway_groups(cluster, uid)))


def test_undecodable_groups_are_logged_once_not_every_poll(run: TenantRun) -> None:
    lines = [line for line in run.operator.log().splitlines() if "undecodable" in line or "rejected" in line]
    assert len(lines) < 200, f"{len(lines)} lines, e.g. {lines[:3]}"
