"""End to end on the test plane: the operator (a subprocess, as `qtune operator` runs it) tunes the
digits example with real trial pods (real ONNX Runtime quantization), survives a SIGKILL mid-job,
continues when maxTrials is raised, cleans up on deletion, elects one of two replicas, and refuses an
earlier history put back while it was stopped."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import opcluster
from clusterlib import wait_for
from kubernetes import client

from qtune.operator import constants as c

XEON = {"xeon-0", "xeon-1"}


def _status(cluster: Any, namespace: str, name: str) -> dict[str, Any]:
    job = opcluster.get_job(cluster, namespace, name)
    return (job or {}).get("status") or {}


def _wait_state(cluster: Any, namespace: str, name: str, states: set[str], timeout: float,
                min_started: int = 0) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def done() -> bool:
        seen.clear()
        seen.update(_status(cluster, namespace, name))
        return seen.get("state") in states and seen.get("trials", {}).get("started", 0) >= min_started

    wait_for(done, timeout, f"job {namespace}/{name} in {states}", detail=lambda: repr(seen), interval=0.5)
    return dict(seen)


def _wait_until(cluster: Any, namespace: str, name: str, ok: Any, timeout: float, what: str) -> None:
    """Wait for ok(status); fail at once (with the job's message) if the job fails instead."""
    seen: dict[str, Any] = {}

    def check() -> bool:
        seen.clear()
        seen.update(_status(cluster, namespace, name))
        assert seen.get("state") != "Failed", f"the job failed: {seen.get('reason')}: {seen.get('message')}"
        return bool(ok(seen))

    wait_for(check, timeout, what, detail=lambda: repr(seen), interval=0.2)


def _history(cluster: Any, namespace: str, name: str) -> list[dict[str, Any]]:
    from qtune.operator.store import decode_history
    from qtune.tuning import codec

    body = client.CoreV1Api(cluster.api_client()).read_namespaced_config_map(f"{name}-history", namespace)
    history = decode_history({"data": body.data, "binaryData": body.binary_data})
    assert history is not None
    return [codec.dump(t) for t in history.trials]


def test_digits_end_to_end_with_operator_restart(cluster: Any, op_namespace: str, workspace: Path,
                                                 start_operator: Any, tmp_path: Path) -> None:
    ns, name = op_namespace, "digits"
    operator = start_operator([ns], "--keep-succeeded-pods")
    opcluster.create_job(cluster, ns, opcluster.job_manifest(name, maxTrials=4))
    uid = opcluster.get_job(cluster, ns, name)["metadata"]["uid"]

    # kill the operator (SIGKILL) once trials are running, start it again some seconds later
    _wait_until(cluster, ns, name, lambda st: st.get("trials", {}).get("started", 0) >= 2, 180,
                "two trials started")
    operator.kill()
    time.sleep(6)  # trials go on finishing without the operator
    operator.start()

    status = _wait_state(cluster, ns, name, {"Succeeded", "Failed"}, 240)
    assert status["state"] == "Succeeded", status
    assert status["reason"] == "MaxTrialsReached" and status["progress"] == "4/4"

    # raising maxTrials continues the finished job
    opcluster.custom(cluster).patch_namespaced_custom_object(
        opcluster.GROUP, opcluster.VERSION, ns, opcluster.PLURAL, name, {"spec": {"tuning": {"maxTrials": 6}}})
    status = _wait_state(cluster, ns, name, {"Succeeded", "Failed"}, 180, min_started=6)
    assert status["state"] == "Succeeded" and status["progress"] == "6/6", status
    conditions = {cond["type"]: cond for cond in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True" and conditions["Ready"]["status"] == "True"
    assert conditions["Failed"]["status"] == "False" and conditions["Running"]["status"] == "False"
    assert conditions["Succeeded"]["observedGeneration"] == 2

    # no trial ran twice: one pod run per trial, unique indices and configs in the history
    history = _history(cluster, ns, name)
    assert [t["index"] for t in history] == list(range(6))
    assert len({t["config_key"] for t in history}) == 6
    assert all(t["status"] == "succeeded" for t in history)
    # (a trial whose Secret the killed operator wrote ahead starts under the next attempt, `-a1`: a restarted
    # operator never takes a Secret it did not create; its runs count with the trial's)
    runs = opcluster.pod_runs(cluster, ns)
    trial_runs: dict[str, int] = {}
    for pod, n in runs.items():
        if pod.startswith(f"{name}-trial-"):
            trial = re.sub(r"-a\d+$", "", pod)
            trial_runs[trial] = trial_runs.get(trial, 0) + n
    assert trial_runs == {f"{name}-trial-{i}": 1 for i in range(6)}, runs
    assert runs.get(f"{name}-baseline") == 1

    # trial pods ran on the Intel Xeon pool only, with Guaranteed QoS
    core = client.CoreV1Api(cluster.api_client())
    pods = core.list_namespaced_pod(ns, label_selector=f"{c.LABEL_JOB_UID}={uid},{c.LABEL_ROLE}=trial").items
    assert len(pods) == 6
    assert {p.spec.node_name for p in pods} <= XEON
    assert {p.status.qos_class for p in pods} == {"Guaranteed"}
    assert all(p.metadata.owner_references[0].uid == uid for p in pods)

    # results went through Prometheus into the status; the Pushgateway groups are gone
    assert opcluster.pushgateway_groups(cluster, uid) == []
    assert [t["index"] for t in status["recentTrials"]] == list(range(6))
    assert all(t.get("accuracy", 0) > 0.9 and t.get("modelSizeBytes", 0) > 0 for t in status["recentTrials"])

    # the same winner (and the same trials) as `qtune tune` locally
    best_key, keys = opcluster.local_best(workspace, tmp_path, max_trials=6)
    assert [t["config_key"] for t in history] == keys
    assert status["best"]["configKey"] == best_key
    assert status["best"]["tuneConfig"] == next(t["tune_config"] for t in history if t["config_key"] == best_key)
    assert status["baseline"]["accuracy"] > 0.9 and status["best"]["sizeRatio"] > 2

    # the operator's own metrics
    metrics = operator.metrics()
    assert re.search(r'^qtune_operator_jobs\{state="Succeeded"\} 1\.0$', metrics, re.M)
    assert "qtune_operator_dispatch_latency_seconds_count" in metrics


def test_deleting_a_running_job_leaves_nothing(cluster: Any, op_namespace: str, workspace: Path,
                                               start_operator: Any) -> None:
    ns, name = op_namespace, "doomed"
    start_operator([ns])
    opcluster.create_job(cluster, ns, opcluster.job_manifest(name, maxTrials=20))
    uid = opcluster.get_job(cluster, ns, name)["metadata"]["uid"]
    core = client.CoreV1Api(cluster.api_client())
    selector = f"{c.LABEL_JOB_UID}={uid}"

    def trials_running(_: dict[str, Any]) -> bool:
        pods = core.list_namespaced_pod(ns, label_selector=f"{selector},{c.LABEL_ROLE}=trial").items
        return any(p.status.phase == "Running" for p in pods)

    _wait_until(cluster, ns, name, trials_running, 180, "trial pods running")
    folder = workspace / ".qtune" / f"{name}-{uid[:8]}"
    assert folder.is_dir()
    opcluster.custom(cluster).delete_namespaced_custom_object(opcluster.GROUP, opcluster.VERSION, ns,
                                                              opcluster.PLURAL, name)
    wait_for(lambda: opcluster.get_job(cluster, ns, name) is None, 60, "the job deleted (finalizer done)")
    wait_for(lambda: not core.list_namespaced_pod(ns, label_selector=selector).items, 60, "the job's pods gone")
    assert opcluster.pushgateway_groups(cluster, uid) == []
    time.sleep(3)  # nothing pushes late
    assert opcluster.pushgateway_groups(cluster, uid) == []
    # its folder on the PVC goes too (a short pod of the operator, deleted once it succeeded)
    cleaners = f"{c.LABEL_ROLE}=folder-cleanup"
    wait_for(lambda: not folder.exists(), 60, "the deleted job's folder gone")
    wait_for(lambda: not core.list_namespaced_pod(ns, label_selector=cleaners).items, 60, "the folder cleanup pod gone")
    assert [p.name for p in (workspace / ".qtune").iterdir()] == []


def test_a_spec_the_cluster_cannot_run_gets_invalid_spec(cluster: Any, op_namespace: str, crds: None,
                                                         start_operator: Any) -> None:
    ns = op_namespace
    start_operator([ns])
    manifest = opcluster.job_manifest("no-pvc")
    del manifest["spec"]["workspace"]
    opcluster.create_job(cluster, ns, manifest)
    status = _wait_state(cluster, ns, "no-pvc", {"Failed"}, 60)
    assert status["reason"] == "InvalidSpec"
    assert "spec.workspace.persistentVolumeClaim" in status["message"]
    failed = next(cond for cond in status["conditions"] if cond["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "InvalidSpec"
    assert not client.CoreV1Api(cluster.api_client()).list_namespaced_pod(ns).items


def test_two_peered_replicas_never_both_act(cluster: Any, op_namespace: str, workspace: Path,
                                            start_operator: Any) -> None:
    ns, name = op_namespace, "peered"
    low = start_operator([ns], "--peering", "qtune-test", "--priority", "10", name="low")
    high = start_operator([ns], "--peering", "qtune-test", "--priority", "100", name="high")
    time.sleep(3)  # let the peers see each other
    opcluster.create_job(cluster, ns, opcluster.job_manifest(name, maxTrials=2))
    status = _wait_state(cluster, ns, name, {"Succeeded", "Failed"}, 240)
    assert status["state"] == "Succeeded", status
    assert "baseline started (pod" in high.log()
    assert "started" not in "".join(line for line in low.log().splitlines() if "qtune.operator" in line)
    assert re.search(r"[Pp]aus", low.log()), low.log_tail()


def test_an_earlier_history_put_back_while_the_operator_is_down_is_refused(
        cluster: Any, op_namespace: str, workspace: Path, start_operator: Any) -> None:
    """A tenant who may edit ConfigMaps saves the job's history (signed by the operator: it verifies) and puts it
    back, later, while the operator is stopped: the restarted operator finds it older than the job's status."""
    ns, name = op_namespace, "rollback"
    operator = start_operator([ns])
    opcluster.create_job(cluster, ns, opcluster.job_manifest(name, maxTrials=8, parallelTrials=1))
    core = client.CoreV1Api(cluster.api_client())
    _wait_until(cluster, ns, name, lambda st: st.get("trials", {}).get("finished", 0) >= 1, 240, "one trial done")
    earlier = core.read_namespaced_config_map(c.history_configmap(name), ns)
    _wait_until(cluster, ns, name, lambda st: st.get("trials", {}).get("finished", 0) >= 2, 240, "two trials done")
    operator.stop()
    current = core.read_namespaced_config_map(c.history_configmap(name), ns)
    assert _status(cluster, ns, name)["history"]["sequence"] > 1
    current.data, current.binary_data = earlier.data, earlier.binary_data
    current.metadata.annotations = earlier.metadata.annotations
    core.replace_namespaced_config_map(c.history_configmap(name), ns, current)
    operator.start()
    status = _wait_state(cluster, ns, name, {"Succeeded", "Failed"}, 120)
    assert status["state"] == "Failed" and status["reason"] == "HistoryRejected", status
    assert f"ConfigMap {ns}/{c.history_configmap(name)}" in status["message"], status["message"]
    assert "older than the job's status" in status["message"], status["message"]
