"""The test plane is a real Kubernetes: schema validation, scheduling, node agent, GC, RBAC,
Prometheus + Pushgateway. One plane per session (see conftest.py)."""

from __future__ import annotations

import json
import os
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from clusterlib import Cluster, wait_for
from kubernetes import client
from prometheus_client import CollectorRegistry, Gauge, delete_from_gateway, push_to_gateway

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

NFD = "feature.node.kubernetes.io"
INTEL_AFFINITY = {
    "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{
        "matchExpressions": [
            {"key": f"{NFD}/cpu-model.vendor_id", "operator": "In", "values": ["Intel"]},
            {"key": f"{NFD}/cpu-cpuid.AVX512VNNI", "operator": "In", "values": ["true"]},
        ]}]}}
}
DEDICATED_TOLERATION = {"key": "qtune.io/dedicated", "operator": "Equal", "value": "tuning",
                        "effect": "NoSchedule"}
GROUP, VERSION, PLURAL = "test.qtune.io", "v1", "widgets"


def pod_manifest(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "python:3.11-slim", "command": command}
    for key in ("env", "volumeMounts", "workingDir", "resources", "terminationMessagePolicy"):
        if key in spec:
            container[key] = spec.pop(key)
    metadata = {"name": name, **spec.pop("metadata", {})}
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 5,
                 "containers": [container], **spec},
    }


def python(code: str) -> list[str]:
    return ["python", "-c", textwrap.dedent(code)]


def scheduled_node(cluster: Cluster, namespace: str, name: str) -> str:
    pod = cluster.wait_for_pod(namespace, name, lambda p: bool(p.spec.node_name), timeout=30)
    return str(pod.spec.node_name)


def terminated_state(pod: Any) -> Any:
    return pod.status.container_statuses[0].state.terminated


# --------------------------------------------------------------------------- CRD schema


@pytest.fixture(scope="module")
def widget_crd(cluster: Cluster) -> Iterator[str]:
    """A small CRD of our own with an enum and a minimum in its structural schema."""
    ext = client.ApiextensionsV1Api(cluster.api_client())
    name = f"{PLURAL}.{GROUP}"
    schema = {"type": "object", "properties": {"spec": {
        "type": "object", "required": ["size"], "properties": {
            "size": {"type": "integer", "minimum": 1, "maximum": 64},
            "color": {"type": "string", "enum": ["red", "green"], "default": "red"},
        }}}}
    ext.create_custom_resource_definition({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": name},
        "spec": {"group": GROUP, "scope": "Namespaced",
                 "names": {"plural": PLURAL, "singular": "widget", "kind": "Widget"},
                 "versions": [{"name": VERSION, "served": True, "storage": True,
                               "schema": {"openAPIV3Schema": schema}}]},
    })

    def established() -> bool:
        crd = ext.read_custom_resource_definition(name)
        return any(c.type == "Established" and c.status == "True"
                   for c in (crd.status.conditions or []))

    wait_for(established, 30, f"CRD {name} Established")
    yield name
    ext.delete_custom_resource_definition(name)


def test_crd_schema_validation_is_real(cluster: Cluster, widget_crd: str, namespace: str) -> None:
    objs = client.CustomObjectsApi(cluster.api_client())

    def widget(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget",
                "metadata": {"name": name}, "spec": spec}

    ok = objs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                              widget("ok", {"size": 4}))
    assert ok["spec"] == {"size": 4, "color": "red"}  # defaulted by the apiserver

    with pytest.raises(client.ApiException) as err:
        objs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                             widget("bad", {"size": 0, "color": "purple"}))
    assert err.value.status == 422
    body = json.loads(err.value.body)
    assert body["reason"] == "Invalid"
    assert "spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1" \
        in body["message"]
    assert 'spec.color: Unsupported value: "purple": supported values: "red", "green"' \
        in body["message"]

    with pytest.raises(client.ApiException) as err:
        objs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                             widget("bad2", {"color": "green"}))
    assert err.value.status == 422
    assert "spec.size: Required value" in json.loads(err.value.body)["message"]


# --------------------------------------------------------------------------- scheduling


def test_nodes_are_ready_with_nfd_labels_and_leases(cluster: Cluster) -> None:
    core = cluster.core()
    nodes = {n.metadata.name: n for n in core.list_node().items}
    assert len(cluster.nodes["xeon"]) == 2 and cluster.nodes["amd"]
    for name in cluster.nodes["xeon"]:
        assert nodes[name].metadata.labels[f"{NFD}/cpu-model.vendor_id"] == "Intel"
        assert nodes[name].metadata.labels[f"{NFD}/cpu-cpuid.AVX512VNNI"] == "true"
    assert any(f"{NFD}/cpu-cpuid.AMXINT8" in nodes[n].metadata.labels
               for n in cluster.nodes["xeon"])
    for name in cluster.nodes["amd"]:
        assert nodes[name].metadata.labels[f"{NFD}/cpu-model.vendor_id"] == "AMD"
    (dedicated,) = cluster.nodes["dedicated"]
    assert [(t.key, t.value, t.effect) for t in nodes[dedicated].spec.taints] == \
        [("qtune.io/dedicated", "tuning", "NoSchedule")]
    for node in nodes.values():
        ready = [c for c in node.status.conditions if c.type == "Ready"]
        assert ready and ready[0].status == "True"
        assert node.status.allocatable["cpu"] == "8"
        assert node.status.allocatable["pods"] == "110"
    coord = client.CoordinationV1Api(cluster.api_client())
    lease = coord.read_namespaced_lease(dedicated, "kube-node-lease")
    age = time.time() - lease.spec.renew_time.timestamp()
    assert age < 30, f"lease of {dedicated} renewed {age:.0f}s ago"


def test_required_node_affinity_lands_only_on_intel_pool(cluster: Cluster, namespace: str) -> None:
    core = cluster.core()
    names = [f"intel-{i}" for i in range(6)]
    for name in names:
        core.create_namespaced_pod(namespace, pod_manifest(name, ["true"],
                                                           affinity=INTEL_AFFINITY))
    amx = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": f"{NFD}/cpu-model.vendor_id", "operator": "In", "values": ["Intel"]},
            {"key": f"{NFD}/cpu-cpuid.AMXINT8", "operator": "Exists"}]}]}}}
    core.create_namespaced_pod(namespace, pod_manifest("amx", ["true"], affinity=amx))
    placed = {name: scheduled_node(cluster, namespace, name) for name in [*names, "amx"]}
    assert set(placed.values()) <= set(cluster.nodes["xeon"]), placed
    # The only untainted AMX node is in the Xeon pool; the dedicated one is tainted.
    amx_nodes = [n.metadata.name for n in core.list_node(
        label_selector=f"{NFD}/cpu-cpuid.AMXINT8=true").items if not n.spec.taints]
    assert placed["amx"] in amx_nodes


def test_taint_keeps_pods_off_the_dedicated_node(cluster: Cluster, namespace: str) -> None:
    core = cluster.core()
    (dedicated,) = cluster.nodes["dedicated"]
    pinned = {"kubernetes.io/hostname": dedicated}
    core.create_namespaced_pod(namespace, pod_manifest("no-toleration", ["true"],
                                                       nodeSelector=pinned))
    core.create_namespaced_pod(namespace, pod_manifest(
        "tolerates", ["true"], nodeSelector=pinned, tolerations=[DEDICATED_TOLERATION]))
    spread = [f"spread-{i}" for i in range(8)]
    for name in spread:
        core.create_namespaced_pod(namespace, pod_manifest(name, ["true"]))

    assert scheduled_node(cluster, namespace, "tolerates") == dedicated
    placed = [scheduled_node(cluster, namespace, name) for name in spread]
    assert dedicated not in placed

    def unschedulable(pod: Any) -> bool:
        return any(c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable"
                   for c in (pod.status.conditions or []))

    pod = cluster.wait_for_pod(namespace, "no-toleration", unschedulable, timeout=30)
    assert pod.spec.node_name is None
    message = next(c.message for c in pod.status.conditions if c.type == "PodScheduled")
    assert "1 node(s) had untolerated taint" in message, message


# --------------------------------------------------------------------------- node agent


def test_pod_runs_to_success(cluster: Cluster, namespace: str) -> None:
    core = cluster.core()
    core.create_namespaced_pod(namespace, pod_manifest("hello", python("print('hello from a pod')")))
    pod = cluster.wait_for_pod(namespace, "hello")
    assert pod.status.phase == "Succeeded"
    state = terminated_state(pod)
    assert (state.exit_code, state.reason) == (0, "Completed")
    assert pod.status.start_time is not None and pod.status.pod_ip == "127.0.0.1"
    assert "hello from a pod" in cluster.pod_log(namespace, "hello")


def test_failing_pod_reports_exit_code_and_termination_message(cluster: Cluster,
                                                               namespace: str) -> None:
    core = cluster.core()
    core.create_namespaced_pod(namespace, pod_manifest("fails", python("""
        import sys
        with open("/dev/termination-log", "w") as f:
            f.write("calibration data not found")
        sys.exit(3)
    """)))
    core.create_namespaced_pod(namespace, pod_manifest(
        "crashes", python("raise ValueError('bad tune config')"),
        terminationMessagePolicy="FallbackToLogsOnError"))
    pod = cluster.wait_for_pod(namespace, "fails")
    assert pod.status.phase == "Failed"
    state = terminated_state(pod)
    assert (state.exit_code, state.reason, state.message) == (3, "Error",
                                                              "calibration data not found")
    pod = cluster.wait_for_pod(namespace, "crashes")
    state = terminated_state(pod)
    assert pod.status.phase == "Failed" and state.exit_code == 1
    assert "ValueError: bad tune config" in state.message


def test_pod_over_its_memory_limit_is_oom_killed(cluster: Cluster, namespace: str) -> None:
    core = cluster.core()
    core.create_namespaced_pod(namespace, pod_manifest(
        "hog", python("import time; b = b'x' * (400 << 20); time.sleep(30)"),
        resources={"limits": {"memory": "100Mi"}}))
    pod = cluster.wait_for_pod(namespace, "hog")
    state = terminated_state(pod)
    assert pod.status.phase == "Failed"
    assert (state.exit_code, state.reason) == (137, "OOMKilled")


def test_pod_env_volumes_and_resources(cluster: Cluster, namespace: str) -> None:
    core = cluster.core()
    core.create_namespaced_persistent_volume_claim(namespace, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "work"},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
    })
    core.create_namespaced_config_map(namespace, {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
        "data": {"mode": "static"}})
    wait_for(lambda: core.read_namespaced_persistent_volume_claim("work", namespace)
             .status.phase == "Bound", 30, "PVC bound")
    code = """
        import json, os
        with open("/workspace/result.json", "w") as f:
            json.dump({"ok": True}, f)
        open("/scratch/tmp.txt", "w").write("x")
        open("/tmp/private.txt", "w").write("x")
        keys = ["POD_NAME", "POD_NAMESPACE", "POD_UID", "NODE", "GREETING", "MODE",
                "OMP_NUM_THREADS", "CPU_LIMIT"]
        out = {k: os.environ.get(k) for k in keys}
        out["cwd"] = os.getcwd()
        out["files"] = sorted(os.listdir("/workspace"))
        out["settings"] = open("/etc/settings/mode").read()
        out["affinity"] = sorted(os.sched_getaffinity(0))
        open("/dev/termination-log", "w").write(json.dumps(out))
    """
    field = [("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace"),
             ("POD_UID", "metadata.uid"), ("NODE", "spec.nodeName")]
    env = [{"name": k, "valueFrom": {"fieldRef": {"fieldPath": p}}} for k, p in field]
    env += [
        {"name": "GREETING", "value": "hi $(POD_NAME)"},
        {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
        {"name": "CPU_LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
    ]
    core.create_namespaced_pod(namespace, pod_manifest(
        "inputs", python(code), env=env, workingDir="/workspace",
        resources={"limits": {"cpu": "1", "memory": "1Gi"},
                   "requests": {"cpu": "1", "memory": "1Gi"}},
        volumeMounts=[{"name": "work", "mountPath": "/workspace"},
                      {"name": "scratch", "mountPath": "/scratch"},
                      {"name": "tmp", "mountPath": "/tmp"},  # hides the host /tmp (state)
                      {"name": "settings", "mountPath": "/etc/settings", "readOnly": True}],
        volumes=[{"name": "work", "persistentVolumeClaim": {"claimName": "work"}},
                 {"name": "scratch", "emptyDir": {}},
                 {"name": "tmp", "emptyDir": {}},
                 {"name": "settings", "configMap": {"name": "settings"}}]))
    pod = cluster.wait_for_pod(namespace, "inputs")
    state = terminated_state(pod)
    assert pod.status.phase == "Succeeded", (state, cluster.pod_log(namespace, "inputs"))
    out = json.loads(state.message)
    assert out["POD_NAME"] == "inputs" and out["POD_NAMESPACE"] == namespace
    assert out["POD_UID"] == pod.metadata.uid and out["NODE"] == pod.spec.node_name
    assert out["GREETING"] == "hi inputs" and out["MODE"] == "static"
    assert out["OMP_NUM_THREADS"] == "1" and out["CPU_LIMIT"] == "1"
    assert out["settings"] == "static" and out["files"] == ["result.json"]
    if (os.cpu_count() or 1) > 1:
        assert len(out["affinity"]) == 1
    if cluster.mount_namespace:
        assert out["cwd"] == "/workspace"
    if cluster.local_agent:
        assert cluster.state_dir is not None
        host = cluster.state_dir / "agent" / "pvc" / namespace / "work" / "result.json"
        assert json.loads(host.read_text()) == {"ok": True}
        pod_dir = cluster.state_dir / "agent" / "pods" / namespace / "inputs" / pod.metadata.uid
        assert (pod_dir / "volumes" / "tmp" / "private.txt").exists()


def test_deleting_a_running_pod_kills_its_process(cluster: Cluster, namespace: str) -> None:
    core = cluster.core()
    core.create_namespaced_pod(namespace, pod_manifest("sleeper", ["sleep", "300"],
                                                       terminationGracePeriodSeconds=2))
    pod = cluster.wait_for_pod(namespace, "sleeper", lambda p: p.status.phase == "Running")
    pid = int(pod.status.container_statuses[0].container_id.rsplit("/", 1)[1])
    assert Path(f"/proc/{pid}").exists() or not cluster.local_agent
    t0 = time.monotonic()
    core.delete_namespaced_pod("sleeper", namespace)

    def gone() -> bool:
        try:
            core.read_namespaced_pod("sleeper", namespace)
            return False
        except client.ApiException as e:
            return e.status == 404

    wait_for(gone, 20, "pod sleeper deleted")
    # sleep has no SIGTERM handler: as a container's PID 1 it ignores the SIGTERM (as on a real
    # node) and is SIGKILLed at the end of its 2s grace period
    elapsed = time.monotonic() - t0
    assert 1.5 < elapsed < 10, elapsed
    if cluster.local_agent:
        assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --------------------------------------------------------------------------- garbage collector


def test_garbage_collector_deletes_dependents(cluster: Cluster, namespace: str) -> None:
    core = cluster.core()
    owner = core.create_namespaced_config_map(namespace, {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid,
           "controller": True, "blockOwnerDeletion": True}
    core.create_namespaced_config_map(namespace, {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "dependent", "ownerReferences": [ref]}})
    core.create_namespaced_pod(namespace, pod_manifest(
        "dependent-pod", ["sleep", "300"], metadata={"ownerReferences": [ref]}))
    cluster.wait_for_pod(namespace, "dependent-pod", lambda p: p.status.phase == "Running")

    core.delete_namespaced_config_map("owner", namespace,
                                      body={"propagationPolicy": "Background"})

    def dependents_gone() -> bool:
        cms = {c.metadata.name for c in core.list_namespaced_config_map(namespace).items}
        pods = core.list_namespaced_pod(namespace).items
        return "dependent" not in cms and not pods

    wait_for(dependents_gone, 60, "garbage collection of the owner's dependents")


# --------------------------------------------------------------------------- RBAC


def test_rbac_service_account_without_permissions_is_forbidden(cluster: Cluster,
                                                                namespace: str) -> None:
    core = cluster.core()
    core.create_namespaced_service_account(namespace, {
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "nobody"}})
    token = core.create_namespaced_service_account_token("nobody", namespace, {
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": 600}}).status.token
    admin_cfg = cluster.api_client().configuration
    cfg = client.Configuration()
    cfg.host, cfg.ssl_ca_cert = admin_cfg.host, admin_cfg.ssl_ca_cert
    cfg.api_key = {"authorization": f"Bearer {token}"}
    as_sa = client.CoreV1Api(client.ApiClient(cfg))

    with pytest.raises(client.ApiException) as err:
        as_sa.list_namespaced_pod(namespace)
    assert err.value.status == 403
    assert f"system:serviceaccount:{namespace}:nobody" in err.value.body

    rbac = client.RbacAuthorizationV1Api(cluster.api_client())
    rbac.create_namespaced_role(namespace, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "pod-reader"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]})
    rbac.create_namespaced_role_binding(namespace, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "nobody-reads-pods"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                    "name": "pod-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "nobody", "namespace": namespace}]})

    def can_list() -> bool:
        try:
            as_sa.list_namespaced_pod(namespace)
            return True
        except client.ApiException as e:
            if e.status == 403:
                return False
            raise

    wait_for(can_list, 10, "the RoleBinding to take effect")
    with pytest.raises(client.ApiException) as err:
        as_sa.list_namespaced_config_map(namespace)
    assert err.value.status == 403


def test_pod_uses_its_service_account_token_in_cluster(cluster: Cluster, namespace: str) -> None:
    """The pod's mounted token works with in-cluster config, and RBAC applies to it."""
    if not cluster.mount_namespace:
        pytest.skip("the client reads /var/run/secrets/...: needs the mount-namespace agent")
    core = cluster.core()
    core.create_namespaced_service_account(namespace, {
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "nobody"}})
    code = """
        from kubernetes import client, config
        config.load_incluster_config()
        v1 = client.CoreV1Api()
        try:
            v1.list_namespaced_pod(open(
                "/var/run/secrets/kubernetes.io/serviceaccount/namespace").read())
            status = 200
        except client.ApiException as e:
            status = e.status
        open("/dev/termination-log", "w").write(str(status))
    """
    core.create_namespaced_pod(namespace, pod_manifest("in-cluster", python(code),
                                                       serviceAccountName="nobody"))
    pod = cluster.wait_for_pod(namespace, "in-cluster", timeout=90)
    state = terminated_state(pod)
    assert pod.status.phase == "Succeeded", (state, cluster.pod_log(namespace, "in-cluster"))
    assert state.message == "403"


# --------------------------------------------------------------------------- Prometheus


def _query(prometheus_url: str, promql: str) -> list[dict[str, Any]]:
    r = requests.get(f"{prometheus_url}/api/v1/query", params={"query": promql}, timeout=5)
    r.raise_for_status()
    return list(r.json()["data"]["result"])


def test_pushed_metric_is_queryable_in_prometheus_and_deleted_with_group(
        cluster: Cluster) -> None:
    if not (cluster.prometheus_url and cluster.pushgateway_url):
        pytest.skip("no Prometheus/Pushgateway configured")
    job_uid, trial = str(uuid.uuid4()), "7"
    registry = CollectorRegistry()
    Gauge("qtune_trial_accuracy", "accuracy of a trial", registry=registry).set(0.9731)
    grouping = {"job_uid": job_uid, "trial": trial}
    push_to_gateway(cluster.pushgateway_url, job="qtune-trial", registry=registry,
                    grouping_key=grouping)
    promql = f'qtune_trial_accuracy{{job_uid="{job_uid}"}}'
    found: list[dict[str, Any]] = []

    def visible() -> bool:
        found[:] = _query(str(cluster.prometheus_url), promql)
        return bool(found)

    wait_for(visible, 20, "the pushed metric in Prometheus")
    (series,) = found
    assert float(series["value"][1]) == pytest.approx(0.9731)
    assert series["metric"]["job"] == "qtune-trial"  # honor_labels keeps the pushed job
    assert series["metric"]["trial"] == trial

    delete_from_gateway(cluster.pushgateway_url, job="qtune-trial", grouping_key=grouping)
    wait_for(lambda: not _query(str(cluster.prometheus_url), promql), 20,
             "the deleted group to go stale in Prometheus")


def _groups(pushgateway_url: str) -> list[dict[str, str]]:
    """The grouping labels of every group the Pushgateway holds."""
    r = requests.get(f"{pushgateway_url}/api/v1/metrics", timeout=5)
    r.raise_for_status()
    return [dict(group["labels"]) for group in r.json()["data"]]


def _push(pushgateway_url: str, job_uid: str) -> None:
    registry = CollectorRegistry()
    Gauge("qtune_trial_accuracy", "accuracy of a trial", registry=registry).set(0.5)
    push_to_gateway(pushgateway_url, job="qtune-trial", registry=registry,
                    grouping_key={"job_uid": job_uid, "trial": "0"})


def test_each_planes_pushgateway_persists_to_its_own_file(tmp_path: Path) -> None:
    """A Pushgateway started as a plane starts it reads no shared (packaged default) file: a new one is
    empty although another persisted a group, and the other gets its group back after a restart."""
    import signal
    import subprocess

    import plane as plane_mod

    def start(state: Path, port: int) -> subprocess.Popen[bytes]:
        argv = plane_mod.pushgateway_argv(state, port)
        assert any(a == f"--persistence.file={state / 'pushgateway' / 'pushgateway.data'}" for a in argv)
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return requests.get(f"{url}/-/ready", timeout=2).ok
            except requests.ConnectionError:
                return False

        wait_for(ready, 20, "the Pushgateway to be ready")
        return proc

    def stop(proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)

    port_a, port_b = plane_mod.free_port(), plane_mod.free_port()
    first = start(tmp_path / "a", port_a)
    try:
        job_uid = str(uuid.uuid4())
        _push(f"http://127.0.0.1:{port_a}", job_uid)
        stop(first)
        second = start(tmp_path / "b", port_b)
        try:
            assert _groups(f"http://127.0.0.1:{port_b}") == []  # a fresh plane's Pushgateway is empty
        finally:
            stop(second)
        first = start(tmp_path / "a", port_a)
        assert [g["job_uid"] for g in _groups(f"http://127.0.0.1:{port_a}")] == [job_uid]
    finally:
        if first.poll() is None:
            stop(first)


def test_the_planes_pushgateway_keeps_its_groups_over_a_restart(cluster: Cluster) -> None:
    assert cluster.plane is not None and cluster.pushgateway_url, "needs the test plane (not an existing cluster)"
    job_uid = str(uuid.uuid4())
    _push(cluster.pushgateway_url, job_uid)
    cluster.plane.restart_pushgateway()
    try:
        assert job_uid in [g.get("job_uid") for g in _groups(cluster.pushgateway_url)]
    finally:
        delete_from_gateway(cluster.pushgateway_url, job="qtune-trial",
                            grouping_key={"job_uid": job_uid, "trial": "0"})


# --------------------------------------------------------------------------- namespaces


def test_namespace_deletion_removes_its_pods(cluster: Cluster) -> None:
    ns = cluster.create_namespace()
    core = cluster.core()
    core.create_namespaced_pod(ns, pod_manifest("sleeper", ["sleep", "300"]))
    pod = cluster.wait_for_pod(ns, "sleeper", lambda p: p.status.phase == "Running")
    pid = int(pod.status.container_statuses[0].container_id.rsplit("/", 1)[1])
    cluster.delete_namespace(ns, wait=True, timeout=90)
    if cluster.local_agent:
        assert not _alive(pid)


def test_a_node_served_again_resyncs_its_pods(cluster: Cluster, namespace: str) -> None:
    """A node that vanished and comes back does what a kubelet back from a reboot does: a pod whose process
    died with the node is Failed with ContainerStatusUnknown (exit 137); a pod bound there while it was away
    starts. (The agent used to leave both as they were for ever: the chaos test's OOM job waited on such a pod.)
    Pods are bound by spec.nodeName, so the scheduler plays no part."""
    if cluster.plane is None:
        pytest.fail("needs the test plane (it loses a node)")
    core, node = cluster.core(), "xeon-1"
    core.create_namespaced_pod(namespace, pod_manifest(
        "was-running", python("import time; time.sleep(300)"), nodeName=node))
    cluster.wait_for_pod(namespace, "was-running", lambda p: p.status.phase == "Running", timeout=60)
    cluster.plane.lose_node(node)
    try:
        core.create_namespaced_pod(namespace, pod_manifest(
            "bound-while-away", python("print('started')"), nodeName=node))
        time.sleep(2)  # the agent kills a lost node's processes within 0.1 s
        phases = {name: core.read_namespaced_pod(name, namespace).status.phase
                  for name in ("was-running", "bound-while-away")}
        assert phases == {"was-running": "Running", "bound-while-away": "Pending"}, phases
    finally:
        cluster.plane.lose_node(node, lost=False)
    pod = cluster.wait_for_pod(namespace, "was-running", timeout=30)
    state = terminated_state(pod)
    assert pod.status.phase == "Failed", pod.status
    assert (state.exit_code, state.reason) == (137, "ContainerStatusUnknown"), state
    pod = cluster.wait_for_pod(namespace, "bound-while-away", timeout=60)
    assert pod.status.phase == "Succeeded", pod.status
