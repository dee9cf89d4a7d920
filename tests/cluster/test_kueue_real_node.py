"""Kueue with a REAL node (issue 21): quota admission of plain pods that run as containers under the kubelet
(realnode.py). The session plane gets Kueue (the ``kueue`` fixture) and one real node (test_real_node.py's
``real_node`` fixture) for this module."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import kueue as kueue_mod
import pytest
import realnode
from clusterlib import Cluster, wait_for
from kubernetes import client
from test_real_node import pod, real_node, terminated  # noqa: F401  (real_node: the module's fixture)

QUOTA = {"cpu": "500m", "memory": "32Mi"}


@pytest.fixture
def team(cluster: Cluster, kueue: Any, namespace: str) -> Iterator[str]:
    delete = kueue_mod.create_queues(cluster.api_client(), namespace, QUOTA, "team")
    yield "team"
    delete()


def _queued_pod(name: str, node: realnode.RealNode, seconds: int) -> dict[str, Any]:
    body = pod(name, node, ["sleep", str(seconds)], resources={"requests": QUOTA, "limits": QUOTA})
    body["metadata"]["labels"] = {kueue_mod.QUEUE_LABEL: "team"}
    return body


def _gated(p: Any) -> bool:
    return any(g.name == kueue_mod.ADMISSION_GATE for g in p.spec.scheduling_gates or [])


def test_quota_wait_on_the_real_node(cluster: Cluster, namespace: str, team: str,
                                     real_node: realnode.RealNode) -> None:  # noqa: F811
    core = cluster.core()
    core.create_namespaced_pod(namespace, _queued_pod("first", real_node, 10))
    cluster.wait_for_pod(namespace, "first", done=lambda p: p.status.phase == "Running", timeout=120)
    core.create_namespaced_pod(namespace, _queued_pod("second", real_node, 1))
    custom = client.CustomObjectsApi(cluster.api_client())

    def pending() -> bool:
        items = custom.list_namespaced_custom_object("kueue.x-k8s.io", "v1beta2", namespace, "workloads")["items"]
        return any(c["type"] == "QuotaReserved" and c["status"] == "False" and "quota" in c.get("message", "")
                   for wl in items for c in wl.get("status", {}).get("conditions", []))

    wait_for(pending, 30, "the second pod's Workload pending on quota")
    assert _gated(core.read_namespaced_pod("second", namespace))
    first = cluster.wait_for_pod(namespace, "first", timeout=120)
    second = cluster.wait_for_pod(namespace, "second", timeout=120)
    assert first.status.phase == second.status.phase == "Succeeded"
    assert first.spec.node_name == second.spec.node_name == real_node.name
    assert terminated(second).started_at >= terminated(first).finished_at


def test_preemption_on_the_real_node(cluster: Cluster, namespace: str, real_node: realnode.RealNode,  # noqa: F811
                                     kueue: Any) -> None:
    """A priority-1000 pod preempts a running container of the same ClusterQueue (preemption LowerPriority):
    Kueue marks the victim (condition TerminationTarget) and deletes it, the kubelet kills its container, and
    the preemptor runs on the real node."""
    api = cluster.api_client()
    high = f"{namespace}-high"
    client.SchedulingV1Api(api).create_priority_class({
        "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": high}, "value": 1000})
    delete = kueue_mod.create_queues(api, namespace, QUOTA, "team", preemption={"withinClusterQueue": "LowerPriority"})
    try:
        core = cluster.core()
        core.create_namespaced_pod(namespace, _queued_pod("low", real_node, 300))
        low = cluster.wait_for_pod(namespace, "low", done=lambda p: p.status.phase == "Running", timeout=120)
        urgent = _queued_pod("urgent", real_node, 1)
        urgent["spec"]["priorityClassName"] = high
        core.create_namespaced_pod(namespace, urgent)
        marks: list[str] = []

        def low_preempted() -> bool:
            try:
                p = core.read_namespaced_pod("low", namespace)
            except client.ApiException as e:
                if e.status == 404:
                    return True
                raise
            marks.extend(f"{c.reason}: {c.message}" for c in p.status.conditions or [] if c.type == "TerminationTarget")
            return p.metadata.uid != low.metadata.uid

        wait_for(low_preempted, 90, "the low-priority pod preempted and deleted")
        done = cluster.wait_for_pod(namespace, "urgent", timeout=120)
        assert done.status.phase == "Succeeded" and done.spec.node_name == real_node.name
        events = core.list_namespaced_event(namespace).items
        preempted = [e.message for e in events if e.reason == "Preempted"]
        assert preempted or marks, sorted({e.reason for e in events})
        print(f"\npreempted on the real node: {(marks or preempted)[0]!r}")
    finally:
        delete()
        client.SchedulingV1Api(api).delete_priority_class(high)
