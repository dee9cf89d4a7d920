"""The operator under faults on the test plane (issue 12): Prometheus down while a trial finishes,
a job no node can run, a node lost under a running trial, a job deleted while the Pushgateway is
unreachable. Each test is one to two minutes."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import opcluster
import pytest
from clusterlib import wait_for
from kubernetes import client
from metric_modules import stalling
from test_operator_e2e import _history, _status, _wait_state

from qtune.operator import constants as c


def _pods(cluster: Any, namespace: str, uid: str, role: str | None = None) -> list[Any]:
    selector = f"{c.LABEL_JOB_UID}={uid}" + (f",{c.LABEL_ROLE}={role}" if role else "")
    return client.CoreV1Api(cluster.api_client()).list_namespaced_pod(namespace, label_selector=selector).items


def _events(cluster: Any, namespace: str, reason: str) -> list[Any]:
    core = client.CoreV1Api(cluster.api_client())
    return [e for e in core.list_namespaced_event(namespace).items if e.reason == reason]


def _plane(cluster: Any) -> Any:
    if cluster.plane is None:
        pytest.skip("needs the test plane (components are stopped and started)")
    return cluster.plane


def test_a_trial_result_survives_a_prometheus_outage(cluster: Any, op_namespace: str, workspace: Path,
                                                     start_operator: Any) -> None:
    """Prometheus stops while the trials finish and stays down for 70 s (longer than the 60 s the
    operator used to wait): the trials are recorded as succeeded once it is back. (The Prometheus path
    alone: with the pods' termination messages the results would not wait for Prometheus at all, see
    test_trial_results_are_recorded_from_termination_messages_while_prometheus_is_down.)"""
    plane = _plane(cluster)
    ns, name = op_namespace, "outage"
    start_operator([ns], "--pushed-results-only")
    opcluster.create_job(cluster, ns, opcluster.job_manifest(name, maxTrials=2, parallelTrials=2))
    uid = opcluster.get_job(cluster, ns, name)["metadata"]["uid"]
    wait_for(lambda: any(p.status.phase in ("Pending", "Running") for p in _pods(cluster, ns, uid, "trial")), 180,
             "trial pods started", interval=0.2)
    plane.stop_component("prometheus")
    try:
        wait_for(lambda: len([p for p in _pods(cluster, ns, uid, "trial") if p.status.phase == "Succeeded"]) == 2,
                 180, "both trial pods succeeded (Prometheus down)", interval=0.5)
        down_since = time.monotonic()
        status: dict[str, Any] = {}

        def waiting() -> bool:
            status.update(_status(cluster, ns, name))
            return status.get("reason") == "WaitingForResults"

        wait_for(waiting, 30, "status WaitingForResults", detail=lambda: repr(status), interval=0.5)
        message = status["message"]
        assert "trial-" in message and "waiting since" in message and "1800" in message, message
        assert "Prometheus" in message, message
        time.sleep(max(0.0, 70 - (time.monotonic() - down_since)))
        status = _status(cluster, ns, name)
        assert status.get("state") == "Running" and status.get("reason") == "WaitingForResults", status
        assert status["trials"]["failed"] == 0, status
    finally:
        plane.start_component("prometheus")
    status = _wait_state(cluster, ns, name, {"Succeeded", "Failed"}, 120)
    assert status["state"] == "Succeeded", status
    history = _history(cluster, ns, name)
    assert [t["status"] for t in history] == ["succeeded", "succeeded"], history


def test_trial_results_are_recorded_from_termination_messages_while_prometheus_is_down(
        cluster: Any, op_namespace: str, workspace: Path, start_operator: Any) -> None:
    """Each succeeded pod's signed result is in its termination message (written by the kubelet into the pod's
    status, which no other tenant can alter): the trials are recorded while Prometheus is down."""
    plane = _plane(cluster)
    ns, name = op_namespace, "termination"
    start_operator([ns])
    opcluster.create_job(cluster, ns, opcluster.job_manifest(name, maxTrials=2, parallelTrials=2))
    uid = opcluster.get_job(cluster, ns, name)["metadata"]["uid"]
    wait_for(lambda: any(p.status.phase in ("Pending", "Running") for p in _pods(cluster, ns, uid, "trial")), 180,
             "trial pods started", interval=0.2)
    plane.stop_component("prometheus")
    try:
        status = _wait_state(cluster, ns, name, {"Succeeded", "Failed"}, 300)
    finally:
        plane.start_component("prometheus")
    assert status["state"] == "Succeeded", status
    history = _history(cluster, ns, name)
    assert [t["status"] for t in history] == ["succeeded", "succeeded"], history


def test_a_job_no_node_can_run_says_why(cluster: Any, op_namespace: str, workspace: Path,
                                        start_operator: Any) -> None:
    ns, name = op_namespace, "nowhere"
    start_operator([ns], "--unschedulable-seconds", "3")
    manifest = opcluster.job_manifest(name, maxTrials=1, parallelTrials=1)
    manifest["spec"]["trial"]["nodeSelector"] = {"qtune.io/pool": "does-not-exist"}
    opcluster.create_job(cluster, ns, manifest)
    status: dict[str, Any] = {}

    def unschedulable() -> bool:
        status.clear()
        status.update(_status(cluster, ns, name))
        return status.get("reason") == "Unschedulable"

    wait_for(unschedulable, 60, "status Unschedulable", detail=lambda: repr(status), interval=0.5)
    # the scheduler's own words, e.g. "0/5 nodes are available: 5 node(s) didn't match Pod's node affinity/selector"
    assert "nodes are available" in status["message"] and "node affinity/selector" in status["message"], status
    assert f"{name}-baseline" in status["message"]
    wait_for(lambda: _events(cluster, ns, "Unschedulable") and any(
        "nodes are available" in (e.message or "") and e.involved_object.name == name
        for e in _events(cluster, ns, "Unschedulable")), 30, "an Unschedulable Event on the job")


def test_a_trial_on_a_lost_node_is_replaced_and_the_job_finishes(cluster: Any, op_namespace: str,
                                                                  workspace: Path, start_operator: Any) -> None:
    plane = _plane(cluster)
    ns, name = op_namespace, "lost-node"
    start_operator([ns], "--node-lost-seconds", "3", "--terminating-margin-seconds", "5")
    manifest = opcluster.job_manifest(name, maxTrials=1, parallelTrials=1)
    opcluster.create_job(cluster, ns, manifest)
    uid = opcluster.get_job(cluster, ns, name)["metadata"]["uid"]
    pod_name = f"{name}-trial-0"
    node: list[str] = []

    def placed() -> bool:
        pods = [p for p in _pods(cluster, ns, uid, "trial") if p.metadata.name == pod_name]
        if pods and pods[0].spec.node_name:
            node[:] = [pods[0].spec.node_name]
            return True
        return False

    # the node is lost as soon as the trial is placed (before it can finish)
    wait_for(placed, 180, "trial 0 placed on a node", interval=0.05)
    plane.lose_node(node[0])
    try:
        wait_for(lambda: any(p.metadata.name == f"{pod_name}-a1" for p in _pods(cluster, ns, uid, "trial")), 120,
                 f"trial 0 started again after {node[0]} was lost", interval=0.5)
        assert not [p for p in _pods(cluster, ns, uid, "trial") if p.metadata.name == pod_name], \
            "the lost pod was force-deleted"
        status = _wait_state(cluster, ns, name, {"Succeeded", "Failed"}, 180)
        assert status["state"] == "Succeeded", status
        assert [t["status"] for t in _history(cluster, ns, name)] == ["succeeded"]
        replaced = [p for p in _pods(cluster, ns, uid, "trial") if p.metadata.name == f"{pod_name}-a1"]
        assert not replaced or replaced[0].spec.node_name != node[0]
        assert any(node[0] in (e.message or "") for e in _events(cluster, ns, "NodeLost"))
    finally:
        plane.lose_node(node[0], lost=False)
        core = client.CoreV1Api(cluster.api_client())

        def ready_again() -> bool:
            conds = {x.type: x.status for x in core.read_node(node[0]).status.conditions or []}
            return conds.get("Ready") == "True"

        wait_for(ready_again, 60, f"{node[0]} Ready again")


def test_a_trial_whose_node_comes_back_without_it_starts_again(cluster: Any, op_namespace: str, workspace: Path,
                                                                start_operator: Any) -> None:
    """A node lost and back before the operator gives it up (node-lost-seconds 600): the trial's process
    died with the node. The node reports the pod Failed, ContainerStatusUnknown (as a kubelet back from a
    reboot does); the operator starts the unit again instead of failing the trial, and the job finishes
    with the trial succeeded. (A node that came back used to leave its pod Running for ever: the unit waited
    for its trial timeout.)"""
    plane = _plane(cluster)
    ns, name = op_namespace, "node-back"
    pod_name = f"{name}-trial-0"
    (workspace / "stall.py").write_text(stalling(pod_name))  # attempt 0 is certainly running when lost
    start_operator([ns], "--node-lost-seconds", "600")
    manifest = opcluster.job_manifest(name, maxTrials=1, parallelTrials=1)
    manifest["spec"]["data"]["evaluation"]["metric"] = "stall:Top1"
    opcluster.create_job(cluster, ns, manifest)
    uid = opcluster.get_job(cluster, ns, name)["metadata"]["uid"]
    node: list[str] = []

    def running() -> bool:
        pods = [p for p in _pods(cluster, ns, uid, "trial") if p.metadata.name == pod_name]
        if pods and pods[0].status.phase == "Running" and pods[0].spec.node_name:
            node[:] = [pods[0].spec.node_name]
            return True
        return False

    wait_for(running, 180, f"{pod_name} running", interval=0.1)
    plane.lose_node(node[0])
    try:
        time.sleep(2)  # the agent kills the lost node's processes within 0.1 s; the pod still says Running
        assert [p.status.phase for p in _pods(cluster, ns, uid, "trial") if p.metadata.name == pod_name] == \
            ["Running"]
    finally:
        plane.lose_node(node[0], lost=False)
    wait_for(lambda: any(p.metadata.name == f"{pod_name}-a1" for p in _pods(cluster, ns, uid, "trial")), 60,
             f"trial 0 started again after {node[0]} came back without it", interval=0.3)
    status = _wait_state(cluster, ns, name, {"Succeeded", "Failed"}, 180)
    assert status["state"] == "Succeeded", status
    assert [t["status"] for t in _history(cluster, ns, name)] == ["succeeded"], _history(cluster, ns, name)
    assert not [p for p in _pods(cluster, ns, uid, "trial") if p.metadata.name == pod_name], \
        "the pod whose container was lost was deleted"
    assert any("ContainerStatusUnknown" in (e.message or "") and pod_name in (e.message or "")
               for e in _events(cluster, ns, "NodeLost")), [e.message for e in _events(cluster, ns, "NodeLost")]


def _push(url: str, uid: str, unit: str) -> None:
    body = b"# TYPE qtune_result_accuracy gauge\nqtune_result_accuracy 0.5\n"
    request = urllib.request.Request(f"{url}/metrics/job/qtune_result/job_uid/{uid}/unit/{unit}", data=body,
                                     method="PUT")
    with urllib.request.urlopen(request, timeout=5):
        pass


def _groups(url: str) -> list[dict[str, str]]:
    with urllib.request.urlopen(f"{url}/api/v1/metrics", timeout=5) as r:
        return [g["labels"] for g in json.load(r)["data"]]


def test_a_job_deleted_while_the_pushgateway_is_down_goes_at_once_and_its_groups_are_swept(
        cluster: Any, op_namespace: str, workspace: Path, start_operator: Any) -> None:
    plane = _plane(cluster)
    ns, name = op_namespace, "deleted"
    start_operator([ns], "--sweep-interval", "2")
    opcluster.create_job(cluster, ns, opcluster.job_manifest(name, maxTrials=20))
    uid = opcluster.get_job(cluster, ns, name)["metadata"]["uid"]
    wait_for(lambda: any(p.status.phase == "Running" for p in _pods(cluster, ns, uid, "trial")), 180,
             "trial pods running", interval=0.3)
    assert not (opcluster.get_job(cluster, ns, name)["metadata"].get("finalizers") or []), "no finalizer on jobs"
    plane.stop_component("pushgateway")
    try:
        started = time.monotonic()
        opcluster.custom(cluster).delete_namespaced_custom_object(opcluster.GROUP, opcluster.VERSION, ns,
                                                                  opcluster.PLURAL, name)
        wait_for(lambda: opcluster.get_job(cluster, ns, name) is None, 30, "the job gone")
        assert time.monotonic() - started < 30
        wait_for(lambda: not _pods(cluster, ns, uid), 60, "the job's pods gone (owner references)")
    finally:
        plane.start_component("pushgateway")
    # what a pod pushed as the job went (the gateway restarted empty: push it again), and a live group
    url = cluster.pushgateway_url
    _push(url, uid, "trial-7")
    assert any(g.get("job_uid") == uid for g in _groups(url))
    wait_for(lambda: not any(g.get("job_uid") == uid for g in _groups(url)), 30, "the deleted job's groups swept")
