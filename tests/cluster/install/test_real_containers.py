"""qtune for real: the image built by scripts/build_image.py, installed with both Helm charts, on the
plane's REAL node (tests/cluster/realnode.py: kubelet + containerd + runc + CNI).

One module fixture builds (or takes from its cache) the image, imports it into the real node
``xeon-real-0`` and installs ``qtune-crds`` and ``qtune`` with the operator scheduled there
(nodeSelector + toleration of the node's taint), the same image for trial pods (the chart's
default trial toleration = the node's taint; the jobs' ``spec.trial.nodeSelector`` keeps their pods
off the fake Xeon nodes) and Prometheus/Pushgateway as pods reach them. Then the kubelet runs
everything: the operator's probes, the unit pods' securityContext, Guaranteed QoS, read-only root
file system, the workspace PVC (a hostPath volume), OOM kills and pod deletion. The chart's results
gateway (on by default) runs there too, on the operator's nodeSelector and toleration: the unit pods
push through it, and a hostile pod holding a running trial's Secret is refused by it.

These tests FAIL (never skip) when something is missing: CI installs everything (scripts/setup.sh)
and the image is built on demand (cached under ~/.cache/qtune/images; warm: instant).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import realnode
from clusterlib import Cluster, wait_for
from helm_support import CRD_CHART, OPERATOR_CHART, run_helm, set_args
from install_cluster import api_server_values
from metric_modules import HOG, stalling

OPERATOR_TESTS = Path(__file__).resolve().parents[1] / "operator"
if str(OPERATOR_TESTS) not in sys.path:
    sys.path.insert(0, str(OPERATOR_TESTS))

import opcluster  # noqa: E402

from qtune.operator import constants as c  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
BUILD_IMAGE = ROOT / "scripts" / "build_image.py"
TOLERATION = {"key": realnode.REAL_NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}
REAL_POOL = {"qtune.io/pool": realnode.REAL_POOL}

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(1800)]


# ------------------------------------------------------------------------------------- helpers


class PodLog:
    """Every pod of a namespace as last seen (polled in a thread): succeeded unit pods are deleted
    once recorded, so what the kubelet made of them must be caught while they exist."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.core = cluster.core()
        self.namespace = namespace
        self.pods: dict[str, Any] = {}
        self.running: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True, name=f"pods-{namespace}")
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                for p in self.core.list_namespaced_pod(self.namespace).items:
                    self.pods[p.metadata.name] = p
                    if p.status.phase == "Running":
                        self.running.add(p.metadata.name)
            except Exception:  # noqa: BLE001 - a transient API error: poll again
                pass
            self._stop.wait(0.3)

    def of_job(self, uid: str) -> list[Any]:
        return [p for p in list(self.pods.values()) if (p.metadata.labels or {}).get(c.LABEL_JOB_UID) == uid]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class Installed:
    cluster: Cluster
    node: realnode.RealNode
    image: str
    operator_namespace: str
    jobs: str
    workspace: Path
    pods: PodLog
    gateway_url: str = ""
    release: str = "qtune"
    notes: dict[str, Any] = field(default_factory=dict)

    def _pod(self, component: str) -> Any:
        pods = self.cluster.core().list_namespaced_pod(
            self.operator_namespace,
            label_selector=f"app.kubernetes.io/name=qtune,app.kubernetes.io/component={component}").items
        pods = [p for p in pods if p.metadata.deletion_timestamp is None]
        assert len(pods) == 1, [p.metadata.name for p in pods]
        return pods[0]

    def operator_pod(self) -> Any:
        return self._pod("operator")

    def gateway_pod(self) -> Any:
        return self._pod("results-gateway")

    def gateway_health(self) -> dict[str, Any]:
        """The results gateway's /healthz: refusals by status, writes the Pushgateway accepted by method."""
        return dict(json.loads(in_node(self, f"{self.gateway_url}/healthz")))

    def operator_log(self) -> str:
        try:
            return self.node.pod_log(self.operator_namespace, self.operator_pod().metadata.name)
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            return f"(no operator log: {exc})"


def _build_image() -> tuple[str, Path]:
    proc = subprocess.run([sys.executable, str(BUILD_IMAGE)], capture_output=True, text=True, check=False,
                          timeout=3600)
    if proc.returncode != 0:
        pytest.fail(f"scripts/build_image.py failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    name, archive = proc.stdout.strip().splitlines()[-2:]
    return name, Path(archive)


def _adopt_crds(cluster: Cluster, release: str, namespace: str) -> None:
    """CRDs applied earlier in the session go under the CRD chart's release (Helm's adoption)."""
    from kubernetes import client

    api = client.ApiextensionsV1Api(cluster.api_client())
    patch = {"metadata": {"labels": {"app.kubernetes.io/managed-by": "Helm"},
                          "annotations": {"meta.helm.sh/release-name": release,
                                          "meta.helm.sh/release-namespace": namespace}}}
    for crd in api.list_custom_resource_definition().items:
        if crd.spec.group in ("qtune.io", "kopf.dev"):
            api.patch_custom_resource_definition(crd.metadata.name, patch)


@pytest.fixture(scope="module")
def real_node(cluster: Cluster) -> Iterator[realnode.RealNode]:
    if cluster.existing:
        pytest.skip("the real node tests start their node on this host's plane")
    assert cluster.plane is not None
    p = cluster.plane
    if p.real:
        yield p.real[0]
        return
    rn = p.add_real_node()
    try:
        yield rn
    finally:
        rn.stop()
        p.real.remove(rn)
        from kubernetes import client

        with p.api_client() as api:
            try:
                client.CoreV1Api(api).delete_node(rn.name)
            except client.ApiException as e:
                if e.status != 404:
                    raise


@pytest.fixture(scope="module")
def installed(cluster: Cluster, helm: Path, real_node: realnode.RealNode) -> Iterator[Installed]:
    t0 = time.monotonic()
    image, archive = _build_image()
    t_build = time.monotonic()
    assert image in real_node.import_image(archive)
    t_import = time.monotonic()
    repository, tag = image.rsplit(":", 1)
    suffix = uuid.uuid4().hex[:6]
    op_ns = cluster.create_namespace(prefix=f"qtune-real-{suffix}-")
    jobs = cluster.create_namespace(prefix=f"qtune-real-jobs-{suffix}-")
    values = {
        "image.repository": repository, "image.tag": tag, "image.pullPolicy": "Never",
        "nodeSelector": REAL_POOL, "tolerations": [TOLERATION],
        "watch.namespaces": [jobs],
        "prometheus.url": real_node.pod_prometheus_url, "pushgateway.url": real_node.pod_pushgateway_url,
        "trial.tolerations": [TOLERATION],
        "operator.logLevel": "DEBUG",
        # short enough for the deleted-pod test to see a replacement soon
        "lifecycle.terminatingMarginSeconds": 10,
        **api_server_values(cluster),
    }
    kube = ["--kubeconfig", str(cluster.kubeconfig)]
    crds_release = f"qtune-crds-{suffix}"
    _adopt_crds(cluster, crds_release, op_ns)
    run_helm(helm, ["install", crds_release, str(CRD_CHART), "--namespace", op_ns, "--wait", "--timeout",
                    "120s", *kube])
    gateway_url = _install_with_the_gateway(cluster, helm, op_ns, values, kube)
    t_helm = time.monotonic()
    pods = PodLog(cluster, jobs)
    inst = Installed(cluster, real_node, image, op_ns, jobs, opcluster.prepare_workspace(cluster, jobs), pods,
                     gateway_url=gateway_url)
    inst.notes.update(build_s=round(t_build - t0, 1), import_s=round(t_import - t_build, 1),
                      helm_s=round(t_helm - t_import, 1))
    sys.stderr.write(f"real containers setup: {inst.notes}\n")
    try:
        yield inst
    finally:
        pods.stop()
        sys.stderr.write(f"operator log tail:\n{inst.operator_log()[-4000:]}\n")
        for name in ("qtune", crds_release):
            run_helm(helm, ["uninstall", name, "--namespace", op_ns, "--wait", "--timeout", "60s", *kube],
                     check=False)
        for name in (jobs, op_ns):
            cluster.delete_namespace(name)


def _install_with_the_gateway(cluster: Cluster, helm: Path, namespace: str, values: dict[str, Any],
                              kube: list[str]) -> str:
    """Install the operator chart with its results gateway (the default); return the gateway's address.

    The real node has no cluster DNS and no Service proxy, so pods reach the gateway at its pod IP (chart value
    resultsGateway.url), as an admin of a cluster without DNS would set it: the chart goes in with no operator
    replica, and once the gateway's pod runs an upgrade starts the operator with that address (the gateway's
    Deployment is unchanged by it, so its pod stays)."""
    run_helm(helm, ["install", "qtune", str(OPERATOR_CHART), "--namespace", namespace, "--wait", "--timeout",
                    "180s", *set_args({**values, "replicaCount": 0}), *kube])
    pods = cluster.core().list_namespaced_pod(
        namespace, label_selector="app.kubernetes.io/component=results-gateway").items
    assert len(pods) == 1 and pods[0].status.pod_ip, [(p.metadata.name, p.status.phase) for p in pods]
    url = f"http://{pods[0].status.pod_ip}:9091"
    values["resultsGateway.url"] = url
    run_helm(helm, ["upgrade", "qtune", str(OPERATOR_CHART), "--namespace", namespace, "--wait", "--timeout",
                    "180s", *set_args(values), *kube])
    return url


def real_job(name: str, **tuning: Any) -> dict[str, Any]:
    """The digits job of the operator tests, its pods on the real node (the chart's default toleration
    lets them there; the pool selector keeps them off the fake Xeon nodes)."""
    manifest = opcluster.job_manifest(name, **tuning)
    manifest["spec"]["trial"]["nodeSelector"] = dict(REAL_POOL)
    return manifest


def stalled_job(inst: Installed, name: str, seconds: int = 300, **tuning: Any) -> tuple[dict[str, Any], str]:
    """`real_job(name)` whose trial-0 (its first attempt) stalls `seconds` at its metric's import, so a test
    certainly catches that pod running; returns the manifest and the pod's name."""
    victim, module = f"{name}-trial-0", f"stall_{name.replace('-', '_')}"
    (inst.workspace / f"{module}.py").write_text(stalling(victim, seconds))
    job = real_job(name, **tuning)
    job["spec"]["data"]["evaluation"]["metric"] = f"{module}:Top1"
    return job, victim


def _status(inst: Installed, name: str) -> dict[str, Any]:
    return (opcluster.get_job(inst.cluster, inst.jobs, name) or {}).get("status") or {}


def wait_finished(inst: Installed, name: str, timeout: float) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def done() -> bool:
        seen.clear()
        seen.update(_status(inst, name))
        return seen.get("state") in ("Succeeded", "Failed")

    wait_for(done, timeout, f"job {name} finished",
             detail=lambda: f"{seen!r}\noperator log:\n{inst.operator_log()[-3000:]}", interval=1)
    return dict(seen)


def history(inst: Installed, name: str) -> list[dict[str, Any]]:
    from qtune.operator.store import decode_history
    from qtune.tuning import codec

    body = inst.cluster.core().read_namespaced_config_map(f"{name}-history", inst.jobs)
    hist = decode_history({"data": body.data, "binaryData": body.binary_data})
    assert hist is not None
    return [codec.dump(t) for t in hist.trials]


def in_node(inst: Installed, url: str) -> str:
    """GET url from inside the real node's network namespace (where pod IPs are routed)."""
    proc = subprocess.run(inst.node.nsenter("curl", "-sS", "--max-time", "5", url), capture_output=True,
                          text=True, check=False, timeout=30)
    assert proc.returncode == 0, (url, proc.stderr)
    return proc.stdout


# --------------------------------------------------------------------------------------- tests


def test_operator_pod_ready_on_the_real_node(installed: Installed) -> None:
    inst = installed
    pod = inst.operator_pod()
    assert pod.spec.node_name == inst.node.name
    container = pod.spec.containers[0]
    assert container.image == inst.image and container.image_pull_policy == "Never"
    assert pod.spec.security_context.run_as_user == 65532 and pod.spec.security_context.run_as_non_root
    assert container.security_context.read_only_root_filesystem is True
    assert container.security_context.allow_privilege_escalation is False
    status = pod.status.container_statuses[0]
    assert status.image_id and status.container_id.startswith("containerd://")

    # the kubelet probes /healthz: Ready, and still never restarted after several liveness periods
    def ready_long_enough() -> bool:
        p = inst.operator_pod()
        conds = {x.type: x.status for x in p.status.conditions or []}
        started = p.status.container_statuses[0].state.running
        return conds.get("Ready") == "True" and started is not None and \
            time.time() - started.started_at.timestamp() > 50

    wait_for(ready_long_enough, 120, "the operator pod Ready for 50s",
             detail=lambda: f"{inst.operator_pod().status}\n{inst.operator_log()[-3000:]}", interval=2)
    pod = inst.operator_pod()
    assert pod.status.container_statuses[0].restart_count == 0, inst.operator_log()[-3000:]
    # the process runs as 65532 (the image's user and the chart's), on a read-only root
    status_file = Path(f"/proc/{_container_pid(inst, pod)}/status").read_text()
    uids = next(line.split()[1:] for line in status_file.splitlines() if line.startswith("Uid:"))
    assert set(uids) == {"65532"}, status_file
    # PID 1 of its container: it sees the kubelet's SIGTERM only through a handler of its own (Kopf's)
    caught = next(line.split()[1] for line in status_file.splitlines() if line.startswith("SigCgt:"))
    assert int(caught, 16) & (1 << (15 - 1)), status_file
    metrics = in_node(inst, f"http://{pod.status.pod_ip}:8000/metrics")
    assert "qtune_" in metrics, metrics[:2000]
    assert in_node(inst, f"http://{pod.status.pod_ip}:8080/healthz")


def _container_pid(inst: Installed, pod: Any) -> int:
    """The host pid of the pod's container process (the node has its own network and mount
    namespaces, not its own pid namespace)."""
    cid = pod.status.container_statuses[0].container_id.split("://", 1)[1]
    proc = subprocess.run(inst.node.nsenter("ctr", "--address", str(inst.node.containerd_socket), "-n",
                                            "k8s.io", "task", "ls"), capture_output=True, text=True, check=True)
    for line in proc.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] == cid:
            return int(parts[1])
    raise AssertionError(f"container {cid} not in `ctr task ls`:\n{proc.stdout}")


def _assert_unit_pod(inst: Installed, pod: Any) -> None:
    assert pod.spec.node_name == inst.node.name, (pod.metadata.name, pod.spec.node_name)
    assert pod.status.qos_class == "Guaranteed", (pod.metadata.name, pod.status.qos_class)
    container = pod.spec.containers[0]
    assert container.image == inst.image
    sc = container.security_context
    assert sc.read_only_root_filesystem is True and sc.run_as_non_root is True and sc.run_as_user == 65532
    assert pod.spec.security_context.run_as_user == 65532


def _pushes_to(pod: Any) -> set[str]:
    """The addresses a unit pod pushes its result to: env QTUNE_PUSHGATEWAY_URL and the `--pushgateway` argument."""
    container = pod.spec.containers[0]
    env = {e.name: e.value for e in container.env or []}
    args = list(container.args or [])
    return {env.get("QTUNE_PUSHGATEWAY_URL"), args[args.index("--pushgateway") + 1] if "--pushgateway" in args
            else None}


def _assert_gateway_pod(inst: Installed) -> None:
    pod = inst.gateway_pod()
    assert pod.spec.node_name == inst.node.name and pod.spec.containers[0].image == inst.image
    assert {x.type: x.status for x in pod.status.conditions or []}.get("Ready") == "True", pod.status
    assert pod.status.container_statuses[0].restart_count == 0
    assert inst.gateway_url == f"http://{pod.status.pod_ip}:9091"


def test_digits_job_on_real_containers(installed: Installed) -> None:
    inst = installed
    t0 = time.monotonic()
    _assert_gateway_pod(inst)
    before = inst.gateway_health()
    opcluster.create_job(inst.cluster, inst.jobs, real_job("real-digits", maxTrials=3, parallelTrials=1))
    status = wait_finished(inst, "real-digits", 600)
    assert status["state"] == "Succeeded", (status, inst.operator_log()[-3000:])
    uid = opcluster.get_job(inst.cluster, inst.jobs, "real-digits")["metadata"]["uid"]
    hist = history(inst, "real-digits")
    assert [t["index"] for t in hist] == [0, 1, 2], hist
    assert all(t["status"] == "succeeded" for t in hist), hist
    assert status["baseline"]["accuracy"] > 0.9 and status["best"]["sizeRatio"] > 2, status
    pods = inst.pods.of_job(uid)
    roles = sorted((p.metadata.labels or {}).get(c.LABEL_ROLE, "") for p in pods)
    assert roles.count("baseline") == 1 and roles.count("trial") == 3, roles
    for pod in pods:
        if (pod.metadata.labels or {}).get(c.LABEL_ROLE) in ("baseline", "trial"):
            _assert_unit_pod(inst, pod)
            assert _pushes_to(pod) == {inst.gateway_url}, (pod.metadata.name, _pushes_to(pod))
    # the results came through the gateway: the baseline's and each trial's push accepted, none refused; the
    # operator deletes the recorded groups through it too
    _assert_gateway_pod(inst)
    after: dict[str, Any] = {}

    def deleted_through_the_gateway() -> bool:
        after.update(inst.gateway_health())
        return after["forwarded"].get("DELETE", 0) > before["forwarded"].get("DELETE", 0)

    wait_for(deleted_through_the_gateway, 60, "the operator's DELETE through the gateway",
             detail=lambda: repr(after))
    pushed = sum(after["forwarded"].get(m, 0) - before["forwarded"].get(m, 0) for m in ("PUT", "POST"))
    assert pushed >= 4, (before, after)
    assert after["refused"] == before["refused"], (before, after)
    # the pods wrote the job's folder of the PVC (a hostPath volume) as uid 65532
    folders = list((inst.workspace / ".qtune").glob("real-digits-*"))
    assert len(folders) == 1, folders
    written = [p for p in folders[0].rglob("*") if p.is_file()]
    assert written and all(p.stat().st_uid == 65532 for p in written), \
        [(str(p), p.stat().st_uid) for p in written]
    sys.stderr.write(f"real-digits: {time.monotonic() - t0:.1f}s\n")


def test_oom_killed_trial_has_the_kubelets_reason(installed: Installed) -> None:
    inst = installed
    (inst.workspace / "hog.py").write_text(HOG)
    job = real_job("real-oom", maxTrials=2, parallelTrials=1, maxConsecutiveFailures=2)
    job["spec"]["data"]["evaluation"]["metric"] = "hog:Top1"
    job["spec"]["trial"]["resources"]["memory"] = "1Gi"
    opcluster.create_job(inst.cluster, inst.jobs, job)
    status = wait_finished(inst, "real-oom", 600)
    hist = history(inst, "real-oom")
    assert [t.get("reason") for t in hist] == ["OOMKilled", "OOMKilled"], hist
    message = hist[0]["message"]
    sys.stderr.write(f"real-oom history message: {message}\n")
    assert "exit code 137" in message and "exceeding its memory limit of 1Gi" in message, message
    assert status["reason"] == "RepeatedFailures", status
    uid = opcluster.get_job(inst.cluster, inst.jobs, "real-oom")["metadata"]["uid"]
    killed = [p for p in inst.pods.of_job(uid) if (p.metadata.labels or {}).get(c.LABEL_ROLE) == "trial"
              and p.status.container_statuses and p.status.container_statuses[0].state.terminated]
    assert killed, [p.metadata.name for p in inst.pods.of_job(uid)]
    t = killed[0].status.container_statuses[0].state.terminated
    assert (t.reason, t.exit_code) == ("OOMKilled", 137), t
    assert killed[0].spec.node_name == inst.node.name


def test_deleted_trial_pod_starts_again(installed: Installed) -> None:
    inst = installed
    job, victim = stalled_job(inst, "real-deleted", maxTrials=2, parallelTrials=1)  # still running when deleted
    opcluster.create_job(inst.cluster, inst.jobs, job)
    uid = opcluster.get_job(inst.cluster, inst.jobs, "real-deleted")["metadata"]["uid"]
    wait_for(lambda: victim in inst.pods.running, 300, f"{victim} running",
             detail=lambda: inst.operator_log()[-2000:], interval=0.3)
    core = inst.cluster.core()
    core.delete_namespaced_pod(victim, inst.jobs)  # the default grace period: 30 s
    deleted = time.monotonic()

    def victim_gone() -> bool:
        return not [p for p in core.list_namespaced_pod(inst.jobs).items if p.metadata.name == victim]

    # the runner (PID 1 of its container) stops on the kubelet's SIGTERM, not at the grace period's SIGKILL
    wait_for(victim_gone, 60, f"{victim} gone", interval=0.2)
    assert time.monotonic() - deleted < 10, time.monotonic() - deleted
    last = inst.pods.pods[victim].status
    state = (last.container_statuses or [None])[0]
    if state is not None and state.state.terminated is not None:  # caught before the pod object went
        assert state.state.terminated.exit_code == 143, state
    wait_for(lambda: any(p.metadata.name.startswith(f"{victim}-a") for p in inst.pods.of_job(uid)), 120,
             f"{victim} started again", detail=lambda: inst.operator_log()[-3000:], interval=0.5)
    status = wait_finished(inst, "real-deleted", 600)
    assert status["state"] == "Succeeded", status
    # the deleted pod's process runs on until the kubelet's SIGTERM and may push its (signed) result first:
    # stale, ignored quietly, never reported as a rejected (forged) result
    assert not status.get("rejectedResults"), (status, inst.operator_log()[-3000:])
    hist = history(inst, "real-deleted")
    assert [t["index"] for t in hist] == [0, 1], hist
    assert all(t["status"] == "succeeded" for t in hist), hist
    names = sorted(p.metadata.name for p in inst.pods.of_job(uid)
                   if (p.metadata.labels or {}).get(c.LABEL_ROLE) == "trial")
    assert victim in names and any(n.startswith(f"{victim}-a") for n in names), names
    for pod in inst.pods.of_job(uid):
        assert pod.spec.node_name == inst.node.name


# ------------------------------------------------------------------------- Kueue on the real node


#: One unit pod's requests on the real node (the job's trial resources below, whole CPUs, and the operator's
#: ephemeral-storage request): the ClusterQueue's quota holds exactly one, and it must cover every resource a pod
#: requests.
ONE_REAL_UNIT = {"cpu": "1", "memory": "1Gi", "ephemeral-storage": "1Gi"}


def _busybox_pod(inst: Installed, name: str, queue: str, seconds: int,
                 priority_class: str | None = None) -> dict[str, Any]:
    """A busybox pod of the LocalQueue asking one unit's quota (at a priority, if given), on the real node."""
    spec: dict[str, Any] = {
        "restartPolicy": "Never", "nodeSelector": dict(REAL_POOL), "tolerations": [TOLERATION],
        "containers": [{"name": "main", "image": inst.node.images["busybox"].ref, "imagePullPolicy": "Never",
                        "command": ["sleep", str(seconds)],
                        "resources": {"requests": ONE_REAL_UNIT, "limits": ONE_REAL_UNIT}}]}
    if priority_class:
        spec["priorityClassName"] = priority_class
    return {"apiVersion": "v1", "kind": "Pod", "spec": spec,
            "metadata": {"name": name, "labels": {"kueue.x-k8s.io/queue-name": queue}}}


def _queue_scene(inst: Installed) -> str:
    """The jobs namespace's pods and Kueue Workloads with their conditions: what a failed wait shows."""
    from kubernetes import client

    lines = []
    for p in inst.cluster.core().list_namespaced_pod(inst.jobs).items:
        gates = [g.name for g in p.spec.scheduling_gates or []]
        conds = [f"{x.type}={x.status}({x.reason})" for x in p.status.conditions or []]
        lines.append(f"pod {p.metadata.name} {p.status.phase} node={p.spec.node_name} gates={gates} {conds}")
    workloads = client.CustomObjectsApi(inst.cluster.api_client()).list_namespaced_custom_object(
        "kueue.x-k8s.io", "v1beta2", inst.jobs, "workloads")["items"]
    for w in workloads:
        conds = [f"{x['type']}={x['status']}({x.get('reason')}: {x.get('message', '')[:120]})"
                 for x in w.get("status", {}).get("conditions", [])]
        lines.append(f"workload {w['metadata']['name']} {conds}")
    return "\n".join(lines)


def _ran(pod: Any) -> tuple[Any, Any] | None:
    state = (pod.status.container_statuses or [None])[0]
    done = state.state.terminated if state is not None else None
    return (done.started_at, done.finished_at) if done is not None and done.started_at else None


def test_kueue_quota_wait_and_preemption_on_the_real_node(installed: Installed, kueue: Any) -> None:
    """The chart's operator (its own RBAC), real Kueue and the real kubelet, a ClusterQueue with room for ONE unit:
    while another workload holds it the job says `Queued` with Kueue's reason and its baseline waits gated, then
    runs; a higher-priority pod of the same queue preempts the running trial-0 (the kubelet kills its container),
    trial-0 runs again as its next attempt, nothing counts as failed, and the job succeeds with every trial
    recorded once."""
    import kueue as kueue_mod
    from kubernetes import client

    inst, name, queue = installed, "real-kueue", "tuning"
    job, victim = stalled_job(inst, name, maxTrials=2, parallelTrials=1)  # still running when Kueue preempts it
    api, core = inst.cluster.api_client(), inst.cluster.core()
    high = f"{inst.jobs}-high"
    client.SchedulingV1Api(api).create_priority_class({
        "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": high}, "value": 1000})
    delete_queues = kueue_mod.create_queues(api, inst.jobs, ONE_REAL_UNIT, queue,
                                            preemption={"withinClusterQueue": "LowerPriority"})
    try:
        core.create_namespaced_pod(inst.jobs, _busybox_pod(inst, "holder", queue, 20))
        inst.cluster.wait_for_pod(inst.jobs, "holder", done=lambda p: p.status.phase == "Running", timeout=120)
        job["spec"]["trial"]["queueName"] = queue
        job["spec"]["trial"]["resources"] = {"cpu": ONE_REAL_UNIT["cpu"], "memory": ONE_REAL_UNIT["memory"]}
        opcluster.create_job(inst.cluster, inst.jobs, job)
        uid = opcluster.get_job(inst.cluster, inst.jobs, name)["metadata"]["uid"]
        queued: dict[str, Any] = {}

        def job_queued() -> bool:
            queued.clear()
            queued.update(_status(inst, name))
            return queued.get("reason") == "Queued" and "insufficient unused quota" in queued.get("message", "")

        wait_for(job_queued, 60, "the job Queued with Kueue's reason while the holder has the quota", interval=0.3,
                 detail=lambda: f"{queued!r}\n{_queue_scene(inst)}")
        assert f"waits for Kueue's admission in LocalQueue {queue}" in queued["message"], queued
        wait_for(lambda: victim in inst.pods.running, 300, f"{victim} running on the real node", interval=0.3,
                 detail=lambda: _queue_scene(inst))
        core.create_namespaced_pod(inst.jobs, _busybox_pod(inst, "urgent", queue, 5, priority_class=high))
        wait_for(lambda: any(p.metadata.name.startswith(f"{victim}-a") for p in inst.pods.of_job(uid)),
                 240, f"{victim} preempted and started again", interval=0.5, detail=lambda: _queue_scene(inst))
        status = wait_finished(inst, name, 600)
        assert status["state"] == "Succeeded", (status, _queue_scene(inst))
        assert status["trials"]["failed"] == 0 and status["trials"]["succeeded"] == 2, status["trials"]
        assert status["best"]["trial"] == 0, status["best"]  # the undisturbed digits job's winner (objective size)
        hist = history(inst, name)
        assert sorted(t["index"] for t in hist) == [0, 1] and all(t["status"] == "succeeded" for t in hist), hist
        for other in ("holder", "urgent"):
            done = inst.cluster.wait_for_pod(inst.jobs, other, timeout=60)
            assert done.status.phase == "Succeeded" and done.spec.node_name == inst.node.name, other
        events = core.list_namespaced_event(inst.jobs).items
        named = [e.message for e in events if e.reason == "UnitPreempted" and e.involved_object.name == name]
        assert len(named) == 1 and named[0].startswith(f"pod {victim} (trial-0) was stopped by Kueue"), named
        pods = [p for p in inst.pods.of_job(uid)
                if (p.metadata.labels or {}).get(c.LABEL_ROLE) in ("baseline", "trial")]
        assert all(p.metadata.labels.get("kueue.x-k8s.io/queue-name") == queue for p in pods)
        assert all(p.spec.node_name == inst.node.name for p in pods if p.spec.node_name), pods
        runs = sorted(r for p in pods if (r := _ran(p)) is not None)
        for (_, end), (start, _) in zip(runs, runs[1:], strict=False):
            assert start >= end, f"two units ran at once under a one-unit quota: {runs}"
        sys.stderr.write(f"real-kueue: queued {queued['message']!r}; preempted: {named[0]!r}\n")
    finally:
        delete_queues()
        client.SchedulingV1Api(api).delete_priority_class(high)


HOSTILE = r'''
import json, os, urllib.error, urllib.request
from qtune import protocol

gateway, uid, secret = os.environ["GATEWAY"], os.environ["JOB_UID"], open("/unit/secret").read().strip()
group = gateway + "/metrics/job/qtune_result/job_uid/" + uid + "/unit/"
body = b"qtune_result_accuracy 0.99\n"


def ask(method, url, data=None, auth=None):
    request = urllib.request.Request(url, data=data, method=method, headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


answers = {
    "put-other-unit": ask("PUT", group + "trial-1", body, protocol.push_authorization(secret, 0, "PUT", body)),
    "put-baseline": ask("PUT", group + "baseline", body, protocol.push_authorization(secret, 0, "PUT", body)),
    "delete-signed": ask("DELETE", group + "baseline", None, protocol.push_authorization(secret, 0, "DELETE", b"")),
    "delete-bare": ask("DELETE", group + "trial-0"),
    "list-signed": ask("GET", gateway + "/api/v1/metrics", None, protocol.push_authorization(secret, 0, "GET", b"")),
    "list-bare": ask("GET", gateway + "/api/v1/metrics"),
}
print(json.dumps(answers))
open("/dev/termination-log", "w").write(json.dumps(answers))
'''
"""What a pod of the jobs namespace holding a running trial's unit Secret tries at the results gateway."""


def _hostile_pod(inst: Installed, name: str, secret: str, uid: str) -> dict[str, Any]:
    """A plain pod (no operator labels: no NetworkPolicy of the chart selects it) of the qtune image on the real
    node, the victim trial's Secret mounted, running HOSTILE."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "nodeSelector": dict(REAL_POOL), "tolerations": [TOLERATION],
                     "automountServiceAccountToken": False,
                     "containers": [{"name": "attack", "image": inst.image, "imagePullPolicy": "Never",
                                     "command": ["python", "-c", HOSTILE],
                                     "env": [{"name": "GATEWAY", "value": inst.gateway_url},
                                             {"name": "JOB_UID", "value": uid}],
                                     "volumeMounts": [{"name": "unit", "mountPath": "/unit", "readOnly": True}]}],
                     "volumes": [{"name": "unit", "secret": {"secretName": secret}}]}}


def test_a_pod_holding_a_trials_secret_cannot_write_delete_or_list_through_the_gateway(installed: Installed) -> None:
    inst = installed
    job, victim = stalled_job(inst, "real-victim", seconds=45, maxTrials=2, parallelTrials=1)  # its Secret lives
    opcluster.create_job(inst.cluster, inst.jobs, job)
    uid = opcluster.get_job(inst.cluster, inst.jobs, "real-victim")["metadata"]["uid"]
    wait_for(lambda: victim in inst.pods.running, 300, f"{victim} running",
             detail=lambda: inst.operator_log()[-2000:], interval=0.3)
    before = inst.gateway_health()
    core = inst.cluster.core()
    core.create_namespaced_pod(inst.jobs, _hostile_pod(inst, "hostile", c.unit_key(victim), uid))

    def attacked() -> bool:
        return core.read_namespaced_pod("hostile", inst.jobs).status.phase in ("Succeeded", "Failed")

    wait_for(attacked, 120, "the hostile pod finished",
             detail=lambda: repr(core.read_namespaced_pod("hostile", inst.jobs).status), interval=0.5)
    pod = core.read_namespaced_pod("hostile", inst.jobs)
    assert pod.spec.node_name == inst.node.name
    terminated = pod.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 0, inst.node.pod_log(inst.jobs, "hostile")
    answers = json.loads(terminated.message)
    sys.stderr.write(f"hostile pod's answers from the gateway: {answers}\n")
    assert answers == {"put-other-unit": 403, "put-baseline": 403, "delete-signed": 403, "delete-bare": 401,
                       "list-signed": 403, "list-bare": 401}, answers
    after = inst.gateway_health()
    assert after["refused"].get("403", 0) - before["refused"].get("403", 0) >= 4, (before, after)
    assert after["refused"].get("401", 0) - before["refused"].get("401", 0) >= 2, (before, after)
    # the victim is untouched: it succeeds with every trial recorded once, each pod started once
    status = wait_finished(inst, "real-victim", 600)
    assert status["state"] == "Succeeded" and not status.get("rejectedResults"), status
    hist = history(inst, "real-victim")
    assert [t["index"] for t in hist] == [0, 1] and all(t["status"] == "succeeded" for t in hist), hist
    trials = sorted(p.metadata.name for p in inst.pods.of_job(uid) if (p.metadata.labels or {}).get(c.LABEL_ROLE)
                    == "trial")
    assert trials == ["real-victim-trial-0", "real-victim-trial-1"], trials
