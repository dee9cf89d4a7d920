"""Install with Helm on the real test control plane; prove the RBAC is enough and no more.

* both charts install (`helm install`, as a cluster admin would) and the objects are there;
* the operator's ServiceAccount token may do what the operator needs in the namespace it serves,
  and nothing else: never read a Secret (it creates and deletes each unit's result Secret in
  the namespaces it serves, and nothing more), no pods or ConfigMaps in other namespaces, nothing
  cluster-wide but reading CRDs/Namespaces (SelfSubjectAccessReview with that token, plus real
  calls that must be refused);
* the trial ServiceAccount may do nothing;
* `qtune operator`, run with the chart's arguments and environment and ONLY that token, tunes a
  QuantizationJob end to end (baseline pod, trial pods, history ConfigMap, status, events) and
  leaves a job in a namespace it does not serve alone;
* the chart's Deployment runs the operator as a pod (in-cluster credentials) and its probe
  endpoint answers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from clusterlib import wait_for
from helm_support import kubectl_binary, run_helm, set_args
from install_cluster import OperatorProcess, Release, free_port

log = logging.getLogger("qtune.tests.install")

ROOT = Path(__file__).resolve().parents[3]
DIGITS = ROOT / "examples" / "digits"
GROUP, VERSION, PLURAL = "qtune.io", "v1alpha1", "quantizationjobs"
CLAIM = "qtune-work"
WORKSPACE_LABEL = "qtune.io/workspace"


PERMISSION_ERROR = re.compile(r'" 403 |\(403\)|403 Forbidden|\bForbidden\b|\bforbidden\b|Failed to post an event')


def token_client(release: Release, account: str | None = None, namespace: str | None = None) -> Any:
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(release.token_kubeconfig(account, namespace)))
    release.cluster._clients.append(api)
    return api


def can_i(api: Any, verb: str, resource: str, namespace: str = "", group: str = "",
          subresource: str = "") -> bool:
    from kubernetes import client

    attributes = {"verb": verb, "resource": resource, "group": group, "namespace": namespace}
    if subresource:
        attributes["subresource"] = subresource
    review = client.AuthorizationV1Api(api).create_self_subject_access_review(
        {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
         "spec": {"resourceAttributes": attributes}})
    return bool(review.status.allowed)


# --------------------------------------------------------------------------- installation


def test_both_charts_install(release: Release) -> None:
    from kubernetes import client

    api = release.cluster.api_client()
    crd = client.ApiextensionsV1Api(api).read_custom_resource_definition(f"{PLURAL}.{GROUP}")
    assert {c.type: c.status for c in crd.status.conditions}.get("Established") == "True"
    core, rbac, apps = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api), client.AppsV1Api(api)
    ns, served = release.operator_namespace, release.served
    core.read_namespaced_service_account(release.service_account, ns)
    assert apps.read_namespaced_deployment(release.release, ns).spec.replicas == 0
    core.read_namespaced_service(f"{release.release}-metrics", ns)
    rbac.read_namespaced_role(release.release, served)
    rbac.read_namespaced_role_binding(release.release, served)
    trial = core.read_namespaced_service_account("qtune-trial", served)
    assert trial.automount_service_account_token is False
    notes = run_helm(release.helm, release.helm_args("get", "notes", release.release, "--namespace", ns)).stdout
    assert f"Serving: {served}" in notes and "Replicas: 0 (standalone)" in notes
    assert "CRD was not found" not in notes, "the CRD chart was installed first: NOTES must find the CRD"
    # nothing namespaced in the operator's own namespace or in the namespace it does not serve
    for other in (ns, release.unserved):
        assert not [r.metadata.name for r in rbac.list_namespaced_role(other).items
                    if r.metadata.name == release.release]


# --------------------------------------------------------------------------- least privilege


def test_operator_token_can_do_what_the_operator_needs(release: Release) -> None:
    api = token_client(release)
    served = release.served
    needed = [
        ("create", "pods", served, ""), ("list", "pods", served, ""), ("watch", "pods", served, ""),
        ("delete", "pods", served, ""),
        ("get", "configmaps", served, ""), ("create", "configmaps", served, ""),
        ("update", "configmaps", served, ""), ("delete", "configmaps", served, ""),
        ("create", "secrets", served, ""), ("delete", "secrets", served, ""), ("create", "events", served, ""),
        ("create", "serviceaccounts", served, ""), ("create", "roles", served, "rbac.authorization.k8s.io"),
        ("create", "rolebindings", served, "rbac.authorization.k8s.io"),
        # whether an existing job account / Role / RoleBinding is the job's, a named account opted in
        ("get", "serviceaccounts", served, ""), ("get", "roles", served, "rbac.authorization.k8s.io"),
        ("get", "rolebindings", served, "rbac.authorization.k8s.io"),
        # issue 20: a job's RoleBinding goes after its baseline; a workspace PVC must carry the opt-in label
        ("delete", "rolebindings", served, "rbac.authorization.k8s.io"),
        ("get", "persistentvolumeclaims", served, ""),
        ("list", "quantizationjobs", served, GROUP), ("watch", "quantizationjobs", served, GROUP),
        ("patch", "quantizationjobs", served, GROUP),
        ("list", "customresourcedefinitions", "", "apiextensions.k8s.io"),
        ("watch", "customresourcedefinitions", "", "apiextensions.k8s.io"),
        ("get", "nodes", "", ""),  # a unit's pod on a lost node is replaced
    ]
    missing = [n for n in needed if not can_i(api, n[0], n[1], n[2], n[3])]
    assert not missing, f"the chart's RBAC lacks {missing}"
    assert can_i(api, "patch", "quantizationjobs", served, GROUP, subresource="status")


def test_operator_token_cannot_do_anything_else(release: Release) -> None:
    from kubernetes import client

    api = token_client(release)
    served, unserved, own = release.served, release.unserved, release.operator_namespace
    refused = [
        # no reading Secrets, anywhere; no Secrets at all where it does not serve
        *[("get", "secrets", ns, "") for ns in (served, own, unserved, "kube-system", "")],
        *[(verb, "secrets", ns, "") for ns in (served, own, "") for verb in ("list", "watch")],
        *[(verb, "secrets", ns, "") for ns in (own, unserved, "kube-system") for verb in ("create", "delete")],
        ("update", "secrets", served, ""), ("patch", "secrets", served, ""),
        # pods, ConfigMaps, events, jobs only where it serves
        *[(verb, "pods", ns, "") for ns in (unserved, own, "kube-system", "") for verb in ("create", "list")],
        *[("get", "configmaps", ns, "") for ns in (unserved, own, "kube-system")],
        ("create", "events", unserved, ""), ("patch", "quantizationjobs", unserved, GROUP),
        ("list", "quantizationjobs", "", GROUP),
        # nothing it does not need where it does serve
        ("delete", "configmaps", unserved, ""), ("delete", "quantizationjobs", served, GROUP),
        ("deletecollection", "pods", served, ""), ("deletecollection", "configmaps", served, ""),
        ("create", "quantizationjobs", served, GROUP), ("create", "pods/exec", served, ""),
        ("delete", "serviceaccounts", served, ""), ("update", "serviceaccounts", served, ""),
        ("patch", "serviceaccounts", served, ""), ("get", "serviceaccounts", unserved, ""),
        ("delete", "roles", served, "rbac.authorization.k8s.io"),
        ("get", "persistentvolumeclaims", unserved, ""), ("list", "persistentvolumeclaims", served, ""),
        ("escalate", "roles", served, "rbac.authorization.k8s.io"),
        ("bind", "roles", served, "rbac.authorization.k8s.io"),
        ("create", "deployments", served, "apps"),
        # nothing cluster-wide but reading CRDs and namespaces
        ("create", "clusterroles", "", "rbac.authorization.k8s.io"),
        ("create", "clusterrolebindings", "", "rbac.authorization.k8s.io"),
        ("create", "customresourcedefinitions", "", "apiextensions.k8s.io"),
        ("create", "namespaces", "", ""), ("patch", "nodes", "", ""),
        ("impersonate", "serviceaccounts", served, ""), ("impersonate", "users", "", ""),
    ]
    granted = [r for r in refused if can_i(api, r[0], r[1], r[2], r[3])]
    assert not granted, f"the operator's ServiceAccount may do more than it needs: {granted}"

    # and real calls are refused by the API server
    core = client.CoreV1Api(api)
    for call in (lambda: core.list_namespaced_secret(served), lambda: core.list_secret_for_all_namespaces(),
                 lambda: core.list_namespaced_pod(unserved), lambda: core.list_namespaced_config_map(own)):
        with pytest.raises(client.ApiException) as refused_call:
            call()
        assert refused_call.value.status == 403


def test_trial_service_account_can_do_nothing(release: Release) -> None:
    api = token_client(release, "qtune-trial", release.served)
    served = release.served
    for verb, resource, group in (("get", "configmaps", ""), ("list", "pods", ""), ("get", "secrets", ""),
                                  ("list", "quantizationjobs", GROUP), ("create", "events", ""),
                                  ("get", "serviceaccounts", "")):
        assert not can_i(api, verb, resource, served, group), f"qtune-trial may {verb} {resource}"


# --------------------------------------------------------------------------- end to end


def digits_job(name: str, namespace: str) -> dict[str, Any]:
    """A small QuantizationJob of the bundled digits CNN (model and data on the workspace PVC)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "QuantizationJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"framework": "onnxruntime", "path": "model.onnx"},
            "data": {"calibration": {"path": "calib.npz", "samples": 64},
                     "evaluation": {"path": "eval.npz", "metric": "top1"}},
            "quantization": {"approach": "static", "format": "QDQ"},
            "tuning": {"strategy": "basic", "accuracyCriterion": {"relative": 0.05}, "objective": "latency",
                       "maxTrials": 2, "parallelTrials": 1, "timeoutSeconds": 600, "trialTimeoutSeconds": 300},
            "benchmark": {"batchSizes": [1], "warmupRuns": 2, "runs": 10},
            "trial": {"resources": {"cpu": 1, "memory": "2Gi"}},
            "workspace": {"persistentVolumeClaim": CLAIM},
        },
    }


def prepare_workspace(release: Release) -> None:
    """The workspace PVC of the served namespace, filled with the digits model and data."""
    from kubernetes import client

    cluster = release.cluster
    if cluster.state_dir is None or cluster.existing:
        pytest.skip("filling a PVC needs the test plane's host-path provisioner")
    core = cluster.core()
    core.create_namespaced_persistent_volume_claim(release.served, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": CLAIM, "labels": {WORKSPACE_LABEL: "true"}},  # opted in (trial.workspaceClaimLabel)
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})
    folder = cluster.state_dir / "agent" / "pvc" / release.served / CLAIM

    def bound() -> bool:
        try:
            pvc = core.read_namespaced_persistent_volume_claim(CLAIM, release.served)
        except client.ApiException:
            return False
        return pvc.status.phase == "Bound" and folder.is_dir()

    wait_for(bound, 60, f"PVC {CLAIM} bound")
    names = ("model.onnx", "calib.npz", "eval.npz")
    if not all((DIGITS / name).exists() for name in names):  # a fresh clone: build the example (seconds)
        subprocess.run([sys.executable, str(DIGITS / "build.py")], check=True, cwd=ROOT, timeout=900)
    for name in names:
        shutil.copy(DIGITS / name, folder / name)


def read_job(release: Release, name: str, namespace: str) -> dict[str, Any]:
    from kubernetes import client

    custom = client.CustomObjectsApi(release.cluster.api_client())
    return custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


@pytest.mark.timeout(900)
def test_operator_with_chart_rbac_tunes_a_job_end_to_end(release: Release, operator: OperatorProcess) -> None:
    from kubernetes import client

    prepare_workspace(release)
    custom = client.CustomObjectsApi(release.cluster.api_client())
    custom.create_namespaced_custom_object(GROUP, VERSION, release.served, PLURAL,
                                           digits_job("digits", release.served))
    custom.create_namespaced_custom_object(GROUP, VERSION, release.unserved, PLURAL,
                                           digits_job("not-mine", release.unserved))
    t0 = time.monotonic()
    job: dict[str, Any] = {}

    def finished() -> bool:
        if operator.proc.poll() is not None:
            pytest.fail(f"the operator exited with {operator.proc.returncode}:\n{operator.log()[-4000:]}")
        job.update(read_job(release, "digits", release.served))
        return job.get("status", {}).get("state") in ("Succeeded", "Failed")

    wait_for(finished, 720, "the job to finish", interval=1.0,
             detail=lambda: f"status {job.get('status')}\noperator log:\n{operator.log()[-3000:]}")
    log.info("job finished in %.1fs: %s", time.monotonic() - t0, job["status"].get("message"))
    status = job["status"]
    assert status["state"] == "Succeeded", f"{status}\n{operator.log()[-3000:]}"
    assert status["trials"]["finished"] >= 1 and status["baseline"] and status["best"]

    core = release.cluster.core()
    names = {cm.metadata.name for cm in core.list_namespaced_config_map(release.served).items}
    assert {"digits-baseline", "digits-history"} <= names
    events = core.list_namespaced_event(release.served, field_selector="involvedObject.name=digits").items
    assert events, "the operator posted no Event on the job"
    text = operator.log()
    denied = PERMISSION_ERROR.search(text)
    assert denied is None, f"the operator hit a permission error ({denied.group(0)}):\n{text[-4000:]}"

    # the job in the namespace the operator does not serve was never touched
    other = read_job(release, "not-mine", release.unserved)
    assert not other.get("status") and not other["metadata"].get("finalizers")
    assert not core.list_namespaced_pod(release.unserved).items


# --------------------------------------------------------------------------- the Deployment


@pytest.mark.timeout(300)
def test_chart_deployment_runs_the_operator_pod(release: Release) -> None:
    """replicaCount=1: the Deployment's pod runs `qtune operator` with in-cluster credentials (the
    projected ServiceAccount token) and its health endpoint (what the probes call) answers."""
    from kubernetes import client

    health_port, metrics_port = free_port(), free_port()
    values = {**release.values, "replicaCount": 1, "health.port": health_port, "metrics.port": metrics_port}
    run_helm(release.helm, release.helm_args("upgrade", release.release, str(ROOT / "charts" / "qtune"),
                                             "--namespace", release.operator_namespace, *set_args(values)))
    core = release.cluster.core()
    selector = f"app.kubernetes.io/instance={release.release},app.kubernetes.io/component=operator"
    pods: list[Any] = []

    def running() -> bool:
        pods[:] = core.list_namespaced_pod(release.operator_namespace, label_selector=selector).items
        for p in pods:
            for state in p.status.container_statuses or []:
                if state.state.terminated is not None:
                    raise AssertionError(f"the operator container ended: {state.state.terminated.message}")
        return any(p.status.phase == "Running" for p in pods)

    wait_for(running, 120, "the operator pod running", detail=lambda: repr([p.status for p in pods]))
    pod = next(p for p in pods if p.status.phase == "Running")
    assert pod.spec.service_account_name == release.service_account

    def healthy() -> bool:
        with contextlib.suppress(requests.RequestException):
            return requests.get(f"http://127.0.0.1:{health_port}/healthz", timeout=2).status_code == 200
        return False

    wait_for(healthy, 90, "/healthz of the operator pod",
             detail=lambda: release.cluster.pod_log(release.operator_namespace, pod.metadata.name)[-3000:])
    metrics = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
    assert metrics.status_code == 200
    pod_log = release.cluster.pod_log(release.operator_namespace, pod.metadata.name)
    # an HTTP 403 answer, not any "403" (a random port such as 40305 contains it)
    assert "Forbidden" not in pod_log and not re.search(r"\b403\b", pod_log), pod_log[-3000:]
    run_helm(release.helm, release.helm_args("upgrade", release.release, str(ROOT / "charts" / "qtune"),
                                             "--namespace", release.operator_namespace,
                                             *set_args({**release.values, "replicaCount": 0})))
    with contextlib.suppress(client.ApiException):
        core.delete_namespaced_pod(pod.metadata.name, release.operator_namespace, grace_period_seconds=0)


# --------------------------------------------------------------------------- GitOps, plain variant


def test_plain_gitops_manifests_pass_a_server_side_dry_run(release: Release) -> None:
    """examples/gitops/plain (the charts rendered for a kustomize-only setup) and the jobs stage are
    accepted by the API server: schemas, the CRD's validation rules, RBAC (dry run, nothing kept but
    the two example namespaces, created for real because namespaced objects need them)."""
    kubectl = kubectl_binary()
    if kubectl is None:
        pytest.skip("kubectl not built")
    gitops = ROOT / "examples" / "gitops"

    def apply(path: Path, *flags: str) -> str:
        proc = subprocess.run([str(kubectl), "--kubeconfig", str(release.cluster.kubeconfig), "apply", *flags,
                               "-k", str(path)], capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, f"kubectl apply {' '.join(flags)} -k {path}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    apply(gitops / "namespaces")
    try:
        out = apply(gitops / "plain" / "crds", "--dry-run=server")
        assert "quantizationjobs.qtune.io" in out
        out = apply(gitops / "plain" / "operator", "--dry-run=server")
        for kind in ("deployment.apps/qtune", "role.rbac.authorization.k8s.io/qtune",
                     "serviceaccount/qtune-trial"):
            assert kind in out, out
        out = apply(gitops / "jobs", "--dry-run=server")
        assert "quantizationjob.qtune.io/digits-cnn-int8" in out, out
    finally:
        core = release.cluster.core()
        for name in ("ml-jobs", "qtune-system"):
            with contextlib.suppress(Exception):
                core.delete_namespace(name)


# --------------------------------------------------------------------------- uninstall (last: it removes the CRD)


@pytest.mark.timeout(300)
def test_after_uninstall_deleting_the_crd_with_jobs_finishes(release: Release, operator: OperatorProcess) -> None:
    """Jobs carry no finalizer: after `helm uninstall` of both charts (the operator gone), `kubectl delete
    crd quantizationjobs.qtune.io` with jobs in the cluster completes within a bound. (The CRDs are put
    back afterwards for the tests that follow in this session.)"""
    from kubernetes import client

    custom = client.CustomObjectsApi(release.cluster.api_client())
    job = digits_job("left-behind", release.served)
    job["spec"]["workspace"]["persistentVolumeClaim"] = "no-such-claim"  # it fails InvalidSpec: no pod
    custom.create_namespaced_custom_object(GROUP, VERSION, release.served, PLURAL, job)
    wait_for(lambda: read_job(release, "left-behind", release.served).get("status", {}).get("state"), 60,
             "the operator saw the job", detail=lambda: operator.log()[-2000:])
    assert not read_job(release, "left-behind", release.served)["metadata"].get("finalizers")
    operator.stop()
    crds_release = next(r["name"] for r in json.loads(run_helm(
        release.helm, release.helm_args("list", "--namespace", release.operator_namespace, "-o", "json")).stdout)
        if r["name"].startswith("qtune-crds"))
    for name in (release.release, crds_release):
        run_helm(release.helm, release.helm_args("uninstall", name, "--namespace", release.operator_namespace,
                                                 "--wait", "--timeout", "60s"))
    ext = client.ApiextensionsV1Api(release.cluster.api_client())
    crd = "quantizationjobs.qtune.io"
    started = time.monotonic()
    try:
        ext.delete_custom_resource_definition(crd)

        def gone() -> bool:
            try:
                ext.read_custom_resource_definition(crd)
            except client.ApiException as exc:
                return exc.status == 404
            return False

        wait_for(gone, 60, f"CRD {crd} deleted (no finalizer holds a job)")
        assert time.monotonic() - started < 60
    finally:
        _reinstall_crds(release)


def _reinstall_crds(release: Release) -> None:
    import yaml
    from kubernetes import client

    ext = client.ApiextensionsV1Api(release.cluster.api_client())
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue

            def create(doc: dict[str, Any] = doc) -> bool:
                try:
                    ext.create_custom_resource_definition(doc)
                except client.ApiException as exc:
                    if exc.status != 409:
                        raise
                    try:
                        current = ext.read_custom_resource_definition(doc["metadata"]["name"])
                    except client.ApiException:
                        return False
                    return current.metadata.deletion_timestamp is None
                return True

            wait_for(create, 60, f"CRD {doc['metadata']['name']} created again")
