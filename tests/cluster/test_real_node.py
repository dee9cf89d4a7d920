"""The REAL node of the test plane (realnode.py): kubelet + containerd + runc + CNI bridge.

The session plane gets one real node for this module (``Plane.add_real_node()``), in its own
network and mount namespaces. These tests fail (never skip) when something the node needs is
missing: CI installs everything (tests/cluster/setup.sh). (With QTUNE_USE_EXISTING_CLUSTER=1
they are skipped, as the other host-side checks are.)
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import plane as plane_mod
import pytest
import realnode
import requests
from clusterlib import Cluster, wait_for

TOLERATION = {"key": realnode.REAL_NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}
#: ``ip`` output of the host's network namespace before this module started its real node.
HOST_NET_BEFORE: dict[str, str] = {}


def _host_net() -> dict[str, str]:
    """The host network namespace as ``ip`` shows it (links without counters, addresses)."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                           check=True).stdout
    addrs = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True,
                           check=True).stdout
    return {"links": "\n".join(sorted(line.split("\\")[0] for line in links.splitlines())),
            "addrs": "\n".join(sorted(line.split("\\")[0] for line in addrs.splitlines()))}


@pytest.fixture(scope="module")
def real_node(cluster: Cluster) -> Iterator[realnode.RealNode]:
    if cluster.existing:  # like the other host-side checks: not on an existing cluster
        pytest.skip("the real node tests start their node on this host's plane")
    assert cluster.plane is not None
    p = cluster.plane
    if p.real:
        yield p.real[0]
        return
    HOST_NET_BEFORE.update(_host_net())
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


def pod(name: str, node: realnode.RealNode, command: list[str], **container: Any) -> dict:
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "nodeSelector": {"qtune.io/pool": node.spec.pool},
        "tolerations": [TOLERATION],
        "terminationGracePeriodSeconds": 3,
        "containers": [{"name": "main", "image": node.images["busybox"].ref,
                        "imagePullPolicy": "Never", "command": command, **container}],
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def restricted(cpu: str = "100m", memory: str = "32Mi") -> dict[str, Any]:
    """Container fields: non-root, read-only rootfs, /tmp emptyDir, Guaranteed QoS."""
    res = {"cpu": cpu, "memory": memory}
    return {
        "securityContext": {"runAsUser": 65532, "runAsNonRoot": True,
                            "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
        "resources": {"requests": res, "limits": res},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }


def with_tmp(body: dict) -> dict:
    body["spec"]["volumes"] = [{"name": "tmp", "emptyDir": {}}]
    return body


def terminated(p: Any) -> Any:
    return p.status.container_statuses[0].state.terminated


def test_node_registered_ready_with_labels(cluster: Cluster, real_node: realnode.RealNode) -> None:
    node = cluster.core().read_node(real_node.name)
    conds = {c.type: c.status for c in node.status.conditions}
    assert conds["Ready"] == "True", conds
    labels = node.metadata.labels
    xeon0 = next(n for n in plane_mod.NODES if n.name == "xeon-0")
    assert {k: labels.get(k) for k in xeon0.labels} == xeon0.labels  # same NFD labels
    assert labels["qtune.io/pool"] == "real"
    assert labels[realnode.REAL_NODE_LABEL] == "true"
    assert [(t.key, t.effect) for t in node.spec.taints] == [(realnode.REAL_NODE_LABEL,
                                                             "NoSchedule")]
    info = node.status.node_info
    assert info.kubelet_version == plane_mod.k8s_version()
    assert info.container_runtime_version.startswith("containerd://")
    assert [a.address for a in node.status.addresses if a.type == "InternalIP"] == \
        [real_node.node_ip]
    assert real_node.name in cluster.plane.node_names()["real"]
    # images come from OCI archives (no registry); importing again is idempotent
    assert real_node.images["busybox"].ref in real_node.image_refs()
    assert real_node.import_image(real_node.images["busybox"].archive) == \
        [real_node.images["busybox"].ref]


def test_restricted_pod_succeeds_with_termination_message(
        cluster: Cluster, namespace: str, real_node: realnode.RealNode) -> None:
    script = ("id -u; echo scratch > /tmp/x && cat /tmp/x; "
              "if touch /rootfs-write 2>/dev/null; then echo rootfs-writable; "
              "else echo rootfs-read-only; fi; "
              "echo all-good > /dev/termination-log")
    body = with_tmp(pod("restricted", real_node, ["sh", "-c", script], **restricted()))
    body["spec"]["securityContext"] = {"runAsNonRoot": True, "runAsUser": 65532}
    cluster.core().create_namespaced_pod(namespace, body)
    p = cluster.wait_for_pod(namespace, "restricted", timeout=90)
    assert p.status.phase == "Succeeded", p.status
    assert p.spec.node_name == real_node.name
    assert p.status.qos_class == "Guaranteed"
    t = terminated(p)
    assert (t.exit_code, t.reason, t.message) == (0, "Completed", "all-good\n")
    assert t.container_id.startswith("containerd://")
    out = real_node.pod_log(namespace, "restricted")
    assert out.split() == ["65532", "scratch", "rootfs-read-only"], out


def test_memory_hog_is_oomkilled(cluster: Cluster, namespace: str,
                                 real_node: realnode.RealNode) -> None:
    body = with_tmp(pod("hog", real_node,
                        ["sh", "-c", "exec dd if=/dev/zero of=/dev/null bs=128M count=1"],
                        **restricted(memory="32Mi")))
    cluster.core().create_namespaced_pod(namespace, body)
    p = cluster.wait_for_pod(namespace, "hog", timeout=90)
    t = terminated(p)
    assert p.status.phase == "Failed", p.status
    assert (t.reason, t.exit_code) == ("OOMKilled", 137), t


def test_pod_reaches_pushgateway_and_apiserver(cluster: Cluster, namespace: str,
                                               real_node: realnode.RealNode) -> None:
    assert real_node.pod_pushgateway_url and cluster.prometheus_url
    job = f"realnode_{uuid.uuid4().hex[:8]}"
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    script = (
        # Pushgateway on the host's loopback, through the node's forwarder on the pods' gateway
        f'echo "qtune_realnode_probe 42" | wget -q -O- --post-file=/dev/stdin '
        f'"$PUSHGATEWAY/metrics/job/{job}" && echo pushed; '
        # the API server through the kubernetes Service ClusterIP, as in-cluster config does
        'api="https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT"; '
        f'wget -q -O- --header "Authorization: Bearer $(cat {sa}/token)" "$api/version"; echo; '
        'wget -q -O- "$api/api" 2>&1; echo anonymous-done'
    )
    body = with_tmp(pod("reach", real_node, ["sh", "-c", script],
                        env=[{"name": "PUSHGATEWAY", "value": real_node.pod_pushgateway_url}],
                        **restricted()))
    cluster.core().create_namespaced_pod(namespace, body)
    p = cluster.wait_for_pod(namespace, "reach", timeout=90)
    out = real_node.pod_log(namespace, "reach")
    assert p.status.phase == "Succeeded", (p.status, out)
    env = {e.name: e.value for e in p.spec.containers[0].env or []}
    assert env["PUSHGATEWAY"] == cluster.plane.env()["QTUNE_POD_PUSHGATEWAY_URL"]
    assert "pushed" in out, out
    assert f'"gitVersion": "{plane_mod.k8s_version()}"' in out, out
    # without a token the API server answers (401/403) instead of the connection failing
    assert any(code in out for code in ("401", "403")), out
    assert "anonymous-done" in out

    def in_prometheus() -> bool:
        r = requests.get(f"{cluster.prometheus_url}/api/v1/query",
                         params={"query": f'qtune_realnode_probe{{job="{job}"}}'}, timeout=5)
        res = r.json()["data"]["result"]
        return bool(res) and res[0]["value"][1] == "42"

    wait_for(in_prometheus, 30, "the pushed metric in Prometheus")


def test_pvc_writable_by_non_root(cluster: Cluster, namespace: str,
                                  real_node: realnode.RealNode) -> None:
    core = cluster.core()
    core.create_namespaced_persistent_volume_claim(namespace, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"],
                 "resources": {"requests": {"storage": "1Gi"}}}})
    body = with_tmp(pod("writer", real_node,
                        ["sh", "-c", "echo from-the-pod > /data/out && cat /data/out"],
                        **restricted()))
    body["spec"]["containers"][0]["volumeMounts"].append({"name": "data", "mountPath": "/data"})
    body["spec"]["volumes"].append({"name": "data",
                                    "persistentVolumeClaim": {"claimName": "data"}})
    core.create_namespaced_pod(namespace, body)
    p = cluster.wait_for_pod(namespace, "writer", timeout=90)
    assert p.status.phase == "Succeeded", (p.status, real_node.pod_log(namespace, "writer"))
    pvc = core.read_namespaced_persistent_volume_claim("data", namespace)
    host_path = core.read_persistent_volume(pvc.spec.volume_name).spec.host_path.path
    assert (Path(host_path) / "out").read_text() == "from-the-pod\n"
    assert (Path(host_path) / "out").stat().st_uid == 65532


def _pids_running(arg: str) -> list[int]:
    return sorted(realnode._pids_with_cmdline(f"sleep\0{arg}\0".encode()))


def test_deleting_running_pod_ends_its_container(cluster: Cluster, namespace: str,
                                                 real_node: realnode.RealNode) -> None:
    from kubernetes import client

    marker = str(900000 + uuid.uuid4().int % 99999)
    core = cluster.core()
    core.create_namespaced_pod(namespace, pod("sleeper", real_node, ["sleep", marker]))
    cluster.wait_for_pod(namespace, "sleeper", timeout=90,
                         done=lambda p: p.status.phase == "Running")
    wait_for(lambda: bool(_pids_running(marker)), 10, "the container's process on the host")
    t0 = time.monotonic()
    core.delete_namespaced_pod("sleeper", namespace)

    def gone() -> bool:
        try:
            core.read_namespaced_pod("sleeper", namespace)
            return False
        except client.ApiException as e:
            return e.status == 404

    wait_for(gone, 60, "the pod to be deleted")
    assert not _pids_running(marker), "container process outlived its pod"
    assert time.monotonic() - t0 < 30


def test_host_network_namespace_untouched(real_node: realnode.RealNode) -> None:
    """Runs last: after pods ran, the host still has no bridge, veth, or 10.x address of ours."""
    now = _host_net()
    links = now["links"].splitlines()
    names = {line.split(":")[1].strip().split("@")[0] for line in links}
    assert "cni0" not in names and not [x for x in links if "master cni0" in x], now["links"]
    assert "10.244." not in now["addrs"] and "10.96." not in now["addrs"], now["addrs"]
    if HOST_NET_BEFORE:
        # Addresses unchanged. Links: the same ones, except what other tools on this shared
        # machine may add meanwhile (e.g. a podman/buildah bridge), never attached to cni0.
        assert now["addrs"] == HOST_NET_BEFORE["addrs"]
        before = {line.split(":")[1].strip().split("@")[0]
                  for line in HOST_NET_BEFORE["links"].splitlines()}
        assert before <= names, (before, names)
    # ... while the node's own namespace has them
    out = subprocess.run(real_node.nsenter("ip", "-o", "addr", "show", "cni0"),
                         capture_output=True, text=True, check=True).stdout
    assert f"{real_node.node_ip}/24" in out
