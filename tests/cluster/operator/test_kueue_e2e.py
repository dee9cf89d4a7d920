"""The digits job with spec.trial.queueName on the plane with the real Kueue (issue 21): every unit pod carries
the queue-name label and is admitted by Kueue; a ClusterQueue with room for ONE unit makes a job with
parallelTrials 2 run its units one at a time (the second waits, gated, with Kueue's message), and the job
still succeeds with every trial recorded once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import kueue as kueue_mod
import opcluster
from clusterlib import wait_for
from kubernetes import client

from qtune.operator import constants as c

GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
#: One unit pod's requests (job_manifest: cpu 1, memory 2Gi; the operator's ephemeral-storage request 1Gi): a
#: ClusterQueue must cover every resource a pod requests, or Kueue never admits it.
ONE_UNIT = {"cpu": "1", "memory": "2Gi", "ephemeral-storage": "1Gi"}


def _unit_pods(cluster: Any, namespace: str) -> list[Any]:
    pods = client.CoreV1Api(cluster.api_client()).list_namespaced_pod(namespace, label_selector=c.LABEL_UNIT).items
    return sorted(pods, key=lambda p: p.metadata.creation_timestamp)


def _gated(pod: Any) -> bool:
    return any(g.name == kueue_mod.ADMISSION_GATE for g in pod.spec.scheduling_gates or [])


def _quota_messages(cluster: Any, namespace: str) -> list[str]:
    items = client.CustomObjectsApi(cluster.api_client()).list_namespaced_custom_object(
        GROUP, VERSION, namespace, "workloads")["items"]
    return [cond.get("message", "") for wl in items for cond in wl.get("status", {}).get("conditions", [])
            if cond["type"] == "QuotaReserved" and cond["status"] == "False"]


def _history(cluster: Any, namespace: str, name: str) -> list[dict[str, Any]]:
    from qtune.operator.store import decode_history
    from qtune.tuning import codec

    body = client.CoreV1Api(cluster.api_client()).read_namespaced_config_map(f"{name}-history", namespace)
    history = decode_history({"data": body.data, "binaryData": body.binary_data})
    assert history is not None
    return [codec.dump(t) for t in history.trials]


def test_units_queue_in_kueue_one_at_a_time(cluster: Any, kueue: Any, op_namespace: str, workspace: Path,
                                            start_operator: Any) -> None:
    ns, name = op_namespace, "queued"
    delete_queues = kueue_mod.create_queues(cluster.api_client(), ns, ONE_UNIT, "tuning")
    try:
        start_operator([ns], "--keep-succeeded-pods")
        core = client.CoreV1Api(cluster.api_client())
        core.create_namespaced_pod(ns, _blocker("blocker", 12))  # another workload holds the team's quota
        cluster.wait_for_pod(ns, "blocker", done=lambda p: p.status.phase == "Running", timeout=60)
        manifest = opcluster.job_manifest(name, maxTrials=2, parallelTrials=2)
        manifest["spec"]["trial"]["queueName"] = "tuning"
        opcluster.create_job(cluster, ns, manifest)
        queued: dict[str, Any] = {}

        def job_queued() -> bool:
            queued.clear()
            queued.update((opcluster.get_job(cluster, ns, name) or {}).get("status") or {})
            return queued.get("reason") == "Queued" and "insufficient unused quota" in queued.get("message", "")

        wait_for(job_queued, 60, "the job Queued with Kueue's reason while the blocker holds the quota",
                 detail=lambda: repr(queued))
        assert "waits for Kueue's admission in LocalQueue tuning" in queued["message"], queued
        waited: list[str] = []

        def finished() -> bool:  # meanwhile: a unit pod gated while another holds the quota, and Kueue's reason
            pods = _unit_pods(cluster, ns)
            if any(_gated(p) for p in pods) and any(p.status.phase == "Running" for p in pods):
                waited.extend(m for m in _quota_messages(cluster, ns) if "quota" in m)
            job = opcluster.get_job(cluster, ns, name) or {}
            return (job.get("status") or {}).get("state") in ("Succeeded", "Failed")

        t0 = time.monotonic()
        wait_for(finished, 420, f"job {ns}/{name} finished", interval=0.5)
        status = opcluster.get_job(cluster, ns, name)["status"]
        assert status["state"] == "Succeeded", status
        # the model cleanup pod (a unit pod too, so queued as well) may still wait or run
        wait_for(lambda: all(p.status.phase in ("Succeeded", "Failed") for p in _unit_pods(cluster, ns)), 120,
                 "every unit pod finished", interval=0.5)
        pods = _unit_pods(cluster, ns)
        assert len(pods) >= 3 and all(p.metadata.labels.get(kueue_mod.QUEUE_LABEL) == "tuning" for p in pods)
        runs = sorted((p.status.container_statuses[0].state.terminated.started_at,
                       p.status.container_statuses[0].state.terminated.finished_at) for p in pods)
        for (_, end), (start, _) in zip(runs, runs[1:], strict=False):
            assert start >= end, f"two units ran at once under a one-unit quota: {runs}"
        assert waited, "no unit was seen waiting for Kueue's admission with a quota message"
        trials = _history(cluster, ns, name)  # every trial recorded once
        assert len(trials) == 2 and len({t["index"] for t in trials}) == 2, trials
        assert cluster.wait_for_pod(ns, "blocker").status.phase == "Succeeded"
        print(f"\nqueued while blocked: {queued['message']!r}")
        print(f"\nqueued job done in {time.monotonic() - t0:.0f}s; units {[p.metadata.name for p in pods]} ran one "
              f"at a time: {runs}; a unit waited with: {waited[0]!r}")
    finally:
        delete_queues()


def _blocker(name: str, seconds: int, priority_class: str | None = None) -> dict[str, Any]:
    """A plain pod in LocalQueue `tuning` asking one unit's worth of quota."""
    spec: dict[str, Any] = {"restartPolicy": "Never", "nodeSelector": {"qtune.io/pool": "xeon"},
                            "containers": [{"name": "main", "image": "busybox", "command": ["sleep", str(seconds)],
                                            "resources": {"requests": ONE_UNIT, "limits": ONE_UNIT}}]}
    if priority_class:
        spec["priorityClassName"] = priority_class
    return {"apiVersion": "v1", "kind": "Pod", "spec": spec,
            "metadata": {"name": name, "labels": {kueue_mod.QUEUE_LABEL: "tuning"}}}


def _wait_pod(cluster: Any, namespace: str, ok: Any, timeout: float, what: str) -> Any:
    found: list[Any] = []

    def check() -> bool:
        found[:] = [p for p in _unit_pods(cluster, namespace) if ok(p)]
        return bool(found)

    wait_for(check, timeout, what, interval=0.2)
    return found[0]


def test_a_preempted_unit_runs_again_and_is_no_failure(cluster: Any, kueue: Any, op_namespace: str,
                                                       workspace: Path, start_operator: Any) -> None:
    """A higher-priority workload in the same ClusterQueue (preemption LowerPriority) makes Kueue preempt a running
    trial pod (it deletes it): the trial runs again as the next attempt once the quota is free, nothing counts as
    failed, and the job succeeds with every trial recorded once."""
    ns, name, high = op_namespace, "preempted", f"{op_namespace}-high"
    api = cluster.api_client()
    client.SchedulingV1Api(api).create_priority_class({
        "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": high}, "value": 1000})
    delete_queues = kueue_mod.create_queues(api, ns, ONE_UNIT, "tuning",
                                            preemption={"withinClusterQueue": "LowerPriority"})
    try:
        start_operator([ns], "--keep-succeeded-pods")
        manifest = opcluster.job_manifest(name, maxTrials=3, parallelTrials=1)
        manifest["spec"]["trial"]["queueName"] = "tuning"
        opcluster.create_job(cluster, ns, manifest)
        victim = _wait_pod(cluster, ns, lambda p: p.metadata.labels.get(c.LABEL_UNIT, "").startswith("trial-")
                           and p.status.phase == "Running", 300, "a trial pod running")
        unit = victim.metadata.labels[c.LABEL_UNIT]
        client.CoreV1Api(api).create_namespaced_pod(ns, _blocker("urgent", 3, priority_class=high))
        again = _wait_pod(cluster, ns, lambda p: p.metadata.labels.get(c.LABEL_UNIT) == unit
                          and p.metadata.uid != victim.metadata.uid, 240, f"{unit} started again")
        wait_for(lambda: (opcluster.get_job(cluster, ns, name) or {}).get("status", {}).get("state")
                 in ("Succeeded", "Failed"), 420, f"job {ns}/{name} finished", interval=0.5)
        status = opcluster.get_job(cluster, ns, name)["status"]
        assert status["state"] == "Succeeded", status
        assert status["trials"]["failed"] == 0 and status["trials"]["succeeded"] == 3, status["trials"]
        trials = _history(cluster, ns, name)
        assert sorted(t["index"] for t in trials) == [0, 1, 2] and all(t["status"] == "succeeded" for t in trials)
        urgent = client.CoreV1Api(api).read_namespaced_pod("urgent", ns)
        assert urgent.status.phase == "Succeeded"
        events = client.CoreV1Api(api).list_namespaced_event(ns).items
        preempted = [e.message for e in events if e.reason == "Preempted"]
        assert preempted, sorted({(e.reason, e.involved_object.kind) for e in events})
        named = [e.message for e in events if e.reason == "UnitPreempted" and e.involved_object.name == name]
        assert len(named) == 1, sorted({(e.reason, e.involved_object.kind) for e in events})
        assert named[0].startswith(f"pod {victim.metadata.name} ({unit}) was stopped by Kueue (WorkloadEvicted"), named
        assert "Preempted to accommodate a workload" in named[0] and named[0].endswith("the unit runs again"), named
        print(f"\n{victim.metadata.name} preempted ({preempted[0]!r}); {unit} ran again as {again.metadata.name}")
    finally:
        delete_queues()
        client.SchedulingV1Api(api).delete_priority_class(high)
