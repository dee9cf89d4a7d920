"""Kueue on the plane is the real thing (issue 21 part 1): its webhooks gate pods with the queue-name
label, its scheduler admits them against a ClusterQueue's quota, and a pod over the quota waits (its
Workload ``QuotaReserved=False`` with Kueue's message) until the first one finishes.

Run: ``QTUNE_REQUIRE_CLUSTER=1 pytest tests/cluster/test_kueue_plane.py`` (Kueue is built on first use
by build_kueue.sh and cached under ~/.cache/qtune/kueue/<version>)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kueue as kueue_mod
import pytest
from clusterlib import Cluster, wait_for
from kubernetes import client

GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
QUEUE_LABEL = kueue_mod.QUEUE_LABEL
GATE = kueue_mod.ADMISSION_GATE


def _custom(cluster: Cluster) -> Any:
    return client.CustomObjectsApi(cluster.api_client())


@pytest.fixture
def queues(cluster: Cluster, kueue: Any, namespace: str) -> Iterator[str]:
    """ResourceFlavor + ClusterQueue (cpu quota 2) + LocalQueue ``team`` in ``namespace``."""
    delete = kueue_mod.create_queues(cluster.api_client(), namespace, {"cpu": "2"}, "team")
    yield "team"
    delete()


def _pod(name: str, queue: str | None, seconds: float) -> dict[str, Any]:
    labels = {QUEUE_LABEL: queue} if queue else {}
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
        "spec": {"restartPolicy": "Never", "nodeSelector": {"qtune.io/pool": "xeon"},
                 "containers": [{"name": "main", "image": "busybox", "command": ["sleep", str(seconds)],
                                 "resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "2"}}}]},
    }


def _gated(pod: Any) -> bool:
    return any(g.name == GATE for g in pod.spec.scheduling_gates or [])


def _workload_of(cluster: Cluster, namespace: str, pod: Any) -> dict[str, Any] | None:
    items = _custom(cluster).list_namespaced_custom_object(GROUP, VERSION, namespace, "workloads")["items"]
    for wl in items:
        if any(o["uid"] == pod.metadata.uid for o in wl["metadata"].get("ownerReferences", [])):
            return wl
    return None


def _condition(wl: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for c in (wl or {}).get("status", {}).get("conditions", []):
        if c["type"] == kind:
            return c
    return {}


def test_kueue_runs_the_built_manager_with_the_planes_webhooks(cluster: Cluster, kueue: Any) -> None:
    """The manager is the binary built from the module; the API server calls its webhooks by URL with
    the plane's CA; pods without the queue-name label are left alone."""
    if kueue is None:
        pytest.skip("an existing cluster's Kueue")
    proc = next(c for c in cluster.plane.components if c.name == "kueue")
    exe = Path(f"/proc/{proc.proc.pid}/exe").resolve()
    assert exe == (kueue.kdir / "bin" / "kueue").resolve()
    hooks = client.AdmissionregistrationV1Api(cluster.api_client())
    mutating = hooks.read_mutating_webhook_configuration("kueue-mutating-webhook-configuration")
    pod_hook = next(w for w in mutating.webhooks if w.name == "mpod.kb.io")
    assert pod_hook.client_config.url == f"{kueue.webhook_url}/mutate--v1-pod"
    assert pod_hook.client_config.ca_bundle
    assert {"kube-system", "kueue-system"} <= set(pod_hook.namespace_selector.match_expressions[0].values)
    plain = cluster.core().create_namespaced_pod("default", _pod("no-queue", None, 1), dry_run="All")
    assert not _gated(plain)


def test_second_pod_waits_for_quota_then_runs(cluster: Cluster, namespace: str, queues: str) -> None:
    """Two pods each asking the whole cpu quota: the first is admitted and runs, the second waits with
    Kueue's reason until the first has finished, then runs."""
    core = cluster.core()
    core.create_namespaced_pod(namespace, _pod("first", queues, 20))
    first = cluster.wait_for_pod(namespace, "first", done=lambda p: not _gated(p) and bool(p.spec.node_name),
                                 timeout=60)
    assert _condition(_workload_of(cluster, namespace, first), "Admitted").get("status") == "True"

    core.create_namespaced_pod(namespace, _pod("second", queues, 1))
    second = core.read_namespaced_pod("second", namespace)
    assert _gated(second), "Kueue's webhook gates a pod with the queue-name label"

    def pending_with_reason() -> bool:
        cond = _condition(_workload_of(cluster, namespace, second), "QuotaReserved")
        return cond.get("status") == "False" and cond.get("reason") == "Pending" and "quota" in cond.get("message", "")

    wait_for(pending_with_reason, 30, "the second pod's Workload pending on quota")
    message = _condition(_workload_of(cluster, namespace, second), "QuotaReserved")["message"]
    first = core.read_namespaced_pod("first", namespace)
    second = core.read_namespaced_pod("second", namespace)
    assert first.status.phase in ("Pending", "Running"), "the first pod still holds the quota"
    assert _gated(second) and not second.spec.node_name, message

    first = cluster.wait_for_pod(namespace, "first", timeout=60)
    assert first.status.phase == "Succeeded"
    finished = first.status.container_statuses[0].state.terminated.finished_at
    second = cluster.wait_for_pod(namespace, "second", timeout=60)
    assert second.status.phase == "Succeeded" and second.spec.node_name in cluster.nodes["xeon"]
    started = second.status.container_statuses[0].state.terminated.started_at
    assert started >= finished, (started, finished)
    assert _condition(_workload_of(cluster, namespace, second), "Finished").get("status") == "True"
    print(f"\nsecond pod waited with: {message!r}")


def test_a_job_with_the_queue_label_is_suspended_until_admitted(cluster: Cluster, namespace: str,
                                                                queues: str) -> None:
    """The batch/job integration: Kueue's webhook suspends the Job, its scheduler unsuspends it."""
    batch = client.BatchV1Api(cluster.api_client())
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": "unit", "labels": {QUEUE_LABEL: queues}},
           "spec": {"backoffLimit": 0, "template": {"spec": _pod("unit", None, 1)["spec"]}}}
    made = batch.create_namespaced_job(namespace, job)
    assert made.spec.suspend is True
    t0 = time.monotonic()

    def done() -> bool:
        return (batch.read_namespaced_job("unit", namespace).status.succeeded or 0) == 1

    wait_for(done, 90, "the Job admitted by Kueue and succeeded")
    print(f"\nJob admitted and done in {time.monotonic() - t0:.1f}s")


def test_the_namespaces_default_local_queue_takes_pods_without_the_label(cluster: Cluster, kueue: Any,
                                                                        namespace: str) -> None:
    """Kueue's LocalQueue defaulting (GA in 0.17): in a namespace with a LocalQueue named `default`, Kueue's
    webhook labels and gates a pod that names no queue: qtune's unit pods are queued without
    spec.trial.queueName (the operator reads the queue from the pod's label)."""
    delete = kueue_mod.create_queues(cluster.api_client(), namespace, {"cpu": "2"}, "default")
    try:
        pod = cluster.core().create_namespaced_pod(namespace, _pod("plain", None, 1))
        assert pod.metadata.labels.get(QUEUE_LABEL) == "default" and _gated(pod)
        done = cluster.wait_for_pod(namespace, "plain", timeout=60)
        assert done.status.phase == "Succeeded"
    finally:
        delete()


def test_uninstall_leaves_the_plane_as_before(cluster: Cluster, kueue: Any) -> None:
    """Last in this module (the fixture's teardown is then a no-op): without Kueue, the plane's other tests see
    no webhook, no Kueue CRD, no kueue process, and a pod with the queue-name label is an ordinary pod."""
    if kueue is None:
        pytest.skip("an existing cluster's Kueue stays")
    cluster.plane.stop_kueue()
    assert cluster.plane.kueue_install is None
    assert not any(c.name == "kueue" for c in cluster.plane.components)
    hooks = client.AdmissionregistrationV1Api(cluster.api_client())
    assert not [w for w in hooks.list_mutating_webhook_configuration().items if w.metadata.name.startswith("kueue-")]
    assert not [w for w in hooks.list_validating_webhook_configuration().items if w.metadata.name.startswith("kueue-")]
    crds = client.ApiextensionsV1Api(cluster.api_client()).list_custom_resource_definition().items
    assert not [c.metadata.name for c in crds if c.spec.group == GROUP]
    pod = cluster.core().create_namespaced_pod("default", _pod("after", "team", 1), dry_run="All")
    assert not _gated(pod)
