"""The Helm charts: `helm lint` and `helm template` of qtune-crds and qtune (no cluster needed).

Needs the helm that tests/install/build_helm.sh builds (skipped without it, failed when
QTUNE_REQUIRE_HELM=1). The rendered objects are checked for what the chart promises: the CRD in
sync with crds/, the operator's probes on Kopf's health endpoint, arguments the real
`qtune operator` parser accepts, least-privilege RBAC, a permission-less trial ServiceAccount.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from helm_support import (
    CRD_CHART,
    OPERATOR_CHART,
    ROOT,
    Manifest,
    crd_documents,
    find,
    helm_binary,
    one,
    operator_container,
    run_helm,
    set_args,
    template,
)

NS = "qtune-system"
#: Resources the operator must never be able to touch (secrets: create/delete only, checked below).
FORBIDDEN = {"*"}
#: Namespaced resources it may only use in the namespaces it serves (Role, not ClusterRole).
NAMESPACED = {"pods", "configmaps", "secrets", "events", "serviceaccounts", "roles", "rolebindings", "quantizationjobs",
              "quantizationjobs/status", "kopfpeerings", "persistentvolumeclaims", "workloads"}
API_SERVER = {"networkPolicy.apiServer.cidrs": ["10.0.0.1/32"]}
"""Every render sets the API server's addresses (the chart refuses to render without them unless waived)."""


@pytest.fixture(scope="module")
def helm() -> Path:
    helm = helm_binary()
    if helm is None:
        message = "helm not built: run bash tests/install/build_helm.sh"
        if os.environ.get("QTUNE_REQUIRE_HELM") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return helm


def render(helm: Path, values: dict[str, Any] | None = None, **kwargs: Any) -> list[Manifest]:
    return template(helm, OPERATOR_CHART, namespace=NS, values={**API_SERVER, **(values or {})}, **kwargs)


def operator_args(values: dict[str, Any] | None = None) -> list[str]:
    """`--set-json` arguments of an operator chart render: API_SERVER, then `values`."""
    return set_args({**API_SERVER, **(values or {})})


def args_of(manifests: list[Manifest]) -> list[str]:
    return operator_container(manifests)["args"]


def env_of(manifests: list[Manifest]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in operator_container(manifests)["env"]}


def rules_of(role: Manifest) -> list[tuple[str, str, set[str]]]:
    return [(group, resource, set(rule["verbs"])) for rule in role.get("rules", [])
            for group in rule.get("apiGroups", [""]) for resource in rule.get("resources", [])]


# --------------------------------------------------------------------------- lint


@pytest.mark.parametrize("values", [
    {},
    {"replicaCount": 2},
    {"watch.namespaces": ["team-a", "team-b"], "metrics.podMonitor.enabled": True,
     "metrics.serviceMonitor.enabled": True},
    {"watch.allNamespaces": True, "trial.serviceAccount.create": False, "replicaCount": 3},
    {"pushgateway.url": "http://pgw.monitoring:9091", "resultsGateway.enabled": True,
     "resultsGateway.pushgatewayPolicy.enabled": True, "resultsGateway.readToken.existingSecret": "prom-read"},
], ids=["defaults", "ha", "namespaces+monitors", "cluster-wide", "results-gateway"])
def test_operator_chart_lints(helm: Path, values: dict[str, Any]) -> None:
    proc = run_helm(helm, ["lint", "--strict", str(OPERATOR_CHART), "--namespace", NS, *operator_args(values)])
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("values", [{}, {"kopfPeering.enabled": False, "keep": False}])
def test_crd_chart_lints(helm: Path, values: dict[str, Any]) -> None:
    proc = run_helm(helm, ["lint", "--strict", str(CRD_CHART), *set_args(values)])
    assert "0 chart(s) failed" in proc.stdout


# --------------------------------------------------------------------------- the CRD chart


@pytest.mark.parametrize("name", ["quantizationjob.yaml", "kopf-peering.yaml"])
def test_crd_chart_copies_are_in_sync_with_crds(name: str) -> None:
    source, copy = ROOT / "crds" / name, CRD_CHART / "files" / name
    assert copy.read_text() == source.read_text(), \
        f"charts/qtune-crds/files/{name} differs from crds/{name}: run charts/qtune-crds/sync-crds.sh"


def test_crd_chart_renders_the_repository_crds(helm: Path) -> None:
    rendered = {m["metadata"]["name"]: m for m in template(helm, CRD_CHART)}
    for name in ("quantizationjob.yaml", "kopf-peering.yaml"):
        for crd in crd_documents(ROOT / "crds" / name):
            got = rendered[crd["metadata"]["name"]]
            assert got["spec"] == crd["spec"], f"{crd['metadata']['name']}: the chart's CRD differs from crds/{name}"
            assert got["apiVersion"] == crd["apiVersion"] and got["kind"] == "CustomResourceDefinition"
            assert got["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
            assert got["metadata"]["labels"]["app.kubernetes.io/component"] == "crd"
    assert set(rendered) == {"quantizationjobs.qtune.io", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"}


def test_crd_chart_can_leave_out_kopf_peering_and_keep(helm: Path) -> None:
    rendered = template(helm, CRD_CHART, values={"kopfPeering.enabled": False, "keep": False})
    assert [m["metadata"]["name"] for m in rendered] == ["quantizationjobs.qtune.io"]
    assert "helm.sh/resource-policy" not in rendered[0]["metadata"].get("annotations", {})


# --------------------------------------------------------------------------- the operator chart


def test_operator_arguments_are_what_qtune_operator_accepts(helm: Path) -> None:
    pytest.importorskip("kopf")
    from qtune.operator.main import build_parser

    for values in ({}, {"replicaCount": 2, "watch.namespaces": ["a", "b"]}, {"watch.allNamespaces": True,
                                                                             "trial.serviceAccount.create": False}):
        manifests = render(helm, values)
        container = operator_container(manifests)
        assert container["command"] == ["qtune"] and container["args"][0] == "operator"
        env = {e["name"]: "7" for e in container["env"]}  # $(VAR) references resolve from env
        argv = [re.sub(r"\$\((\w+)\)", lambda m, env=env: env[m.group(1)], a) for a in container["args"][1:]]
        parsed = build_parser().parse_args(argv)
        if values.get("watch.allNamespaces"):
            assert parsed.all_namespaces and not parsed.namespaces
        else:
            assert parsed.namespaces == values.get("watch.namespaces", [NS])
        assert (parsed.peering == "qtune") == (values.get("replicaCount", 1) > 1)


def test_probes_use_kopf_health_endpoint_and_ports_match(helm: Path) -> None:
    manifests = render(helm, {"health.port": 18080, "metrics.port": 18000})
    container = operator_container(manifests)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 18080, "metrics": 18000}
    assert "--health-port=18080" in container["args"] and "--metrics-port=18000" in container["args"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    service = one(manifests, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    workload = one(manifests, "Deployment")
    assert service["spec"]["selector"] == workload["spec"]["selector"]["matchLabels"]


def test_single_replica_is_a_standalone_deployment_that_recreates(helm: Path) -> None:
    manifests = render(helm)
    deployment = one(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate", "two standalone operators must never overlap"
    assert not find(manifests, "StatefulSet")
    assert not any(a.startswith("--peering") for a in args_of(manifests))


def test_replicas_turn_on_peering_with_distinct_priorities(helm: Path) -> None:
    manifests = render(helm, {"replicaCount": 3})
    sts = one(manifests, "StatefulSet")
    assert sts["spec"]["replicas"] == 3
    args = args_of(manifests)
    assert "--peering=qtune" in args and "--priority=$(QTUNE_PEERING_PRIORITY)" in args
    assert env_of(manifests)["QTUNE_PEERING_PRIORITY"] == {
        "fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}
    role = one(manifests, "Role", namespace=NS)
    assert ("kopf.dev", "kopfpeerings", {"get", "list", "watch", "patch", "create"}) in rules_of(role)
    # without replicas, no peering rule
    assert not [r for r in rules_of(one(render(helm), "Role")) if r[1] == "kopfpeerings"]


def test_replicas_without_peering_are_refused(helm: Path) -> None:
    proc = run_helm(helm, ["template", "q", str(OPERATOR_CHART), *operator_args({"replicaCount": 2,
                                                                              "peering.enabled": False})],
                    check=False)
    assert proc.returncode != 0 and "peering" in proc.stderr


def test_endpoints_and_trial_defaults_reach_the_operator(helm: Path) -> None:
    manifests = render(helm, {"prometheus.url": "http://prometheus.monitoring:9090",
                              "pushgateway.url": "http://pushgateway.monitoring:9091",
                              "pushgateway.podUrl": "http://pgw:9091", "resultsGateway.enabled": False,
                              "image.repository": "registry.example/qtune", "image.tag": "1.2.3",
                              "trial.nodeAffinity.isaLabel": "feature.node.kubernetes.io/cpu-cpuid.AMXINT8"})
    env = env_of(manifests)
    assert env["QTUNE_PROMETHEUS_URL"] == "http://prometheus.monitoring:9090"
    assert env["QTUNE_PUSHGATEWAY_URL"] == "http://pushgateway.monitoring:9091"
    assert env["QTUNE_POD_PUSHGATEWAY_URL"] == "http://pgw:9091"
    assert env["QTUNE_TRIAL_IMAGE"] == "registry.example/qtune:1.2.3"
    assert env["QTUNE_TRIAL_IMAGE_PULL_POLICY"] == "IfNotPresent", "the chart's image.pullPolicy"
    assert env_of(render(helm, {"image.pullPolicy": "Never"}))["QTUNE_TRIAL_IMAGE_PULL_POLICY"] == "Never"
    assert env_of(render(helm, {"image.pullPolicy": "Never", "trial.imagePullPolicy": "Always"}))[
        "QTUNE_TRIAL_IMAGE_PULL_POLICY"] == "Always"
    assert "QTUNE_TRIAL_QUEUE_NAME" not in env, "no Kueue queue unless asked"
    assert env_of(render(helm, {"trial.queueName": "tuning"}))["QTUNE_TRIAL_QUEUE_NAME"] == "tuning"
    assert operator_container(manifests)["image"] == "registry.example/qtune:1.2.3"
    assert "--isa-label=feature.node.kubernetes.io/cpu-cpuid.AMXINT8" in args_of(manifests)
    assert env["QTUNE_TRIAL_TOLERATIONS"] == \
        '[{"effect":"NoSchedule","key":"qtune.io/dedicated","operator":"Equal","value":"tuning"}]'
    # the variables the chart sets for endpoints are the ones the operator reads
    from dataclasses import fields

    from qtune.operator.config import OperatorConfig

    read = {OperatorConfig.env_name(item.name) for item in fields(OperatorConfig)}
    for name in ("QTUNE_PROMETHEUS_URL", "QTUNE_PUSHGATEWAY_URL", "QTUNE_POD_PUSHGATEWAY_URL", "QTUNE_TRIAL_IMAGE",
                 "QTUNE_TRIAL_IMAGE_PULL_POLICY", "QTUNE_TRIAL_TOLERATIONS", "QTUNE_SIGNING_KEY",
                 "QTUNE_TRIAL_QUEUE_NAME"):
        assert name in read, name
    digest = "sha256:" + "a" * 64
    pinned = render(helm, {"image.digest": digest})
    assert operator_container(pinned)["image"] == f"qtune@{digest}"
    assert operator_container(render(helm))["image"] == "qtune:0.1.0", "tag defaults to the appVersion"


def test_pod_is_non_root_read_only_with_a_writable_tmp(helm: Path) -> None:
    manifests = render(helm)
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    container = operator_container(manifests)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}} in pod["volumes"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


# --------------------------------------------------------------------------- RBAC


@pytest.mark.parametrize("values", [{}, {"replicaCount": 2, "watch.namespaces": ["team-a", "team-b"]}],
                         ids=["release-namespace", "two-namespaces"])
def test_rbac_is_least_privilege_and_per_served_namespace(helm: Path, values: dict[str, Any]) -> None:
    manifests = render(helm, values)
    served = values.get("watch.namespaces", [NS])
    sa = one(manifests, "ServiceAccount", name="qtune", namespace=NS)
    subject = {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NS}

    roles = find(manifests, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(served)
    bindings = find(manifests, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == sorted(served)
    for binding in bindings:
        assert binding["subjects"] == [subject]
        assert binding["roleRef"]["kind"] == "Role"

    for role in [*roles, *find(manifests, "ClusterRole")]:
        for group, resource, verbs in rules_of(role):
            assert resource not in FORBIDDEN and group != "*" and "*" not in verbs, \
                f"{role['kind']} {role['metadata']['name']}: {group}/{resource} {verbs}"
            assert not verbs & {"escalate", "bind", "impersonate"}
    cluster_rules = [r for role in find(manifests, "ClusterRole") for r in rules_of(role)]
    assert {res for _, res, _ in cluster_rules} <= {"customresourcedefinitions", "namespaces", "nodes"}, \
        "only cluster-scoped needs in the ClusterRole"
    assert {frozenset(verbs) for _, res, verbs in cluster_rules if res == "nodes"} == {frozenset({"get"})}, \
        "nodes: get only (a unit's pod on a lost node is replaced)"
    assert all(verbs <= {"get", "list", "watch"} for _, _, verbs in cluster_rules), "cluster-wide: read only"
    role = rules_of(roles[0])
    for _group, resource, verbs in role:
        if resource == "secrets":
            assert verbs == {"create", "delete"}, "a unit's secret is created and deleted, never read"
        if resource == "workloads":  # Kueue's reason for a queued unit (issue 21): read only
            assert verbs == {"list"}
        if resource == "rolebindings":  # a job's own, once its baseline is recorded (issue 20)
            assert verbs == {"get", "create", "delete"}
        elif resource not in ("pods", "configmaps", "secrets"):
            assert "delete" not in verbs and "deletecollection" not in verbs, f"{resource}: no deletion needed"
    assert {res for _, res, _ in role} <= NAMESPACED


def test_cluster_wide_mode_uses_a_cluster_role(helm: Path) -> None:
    manifests = render(helm, {"watch.allNamespaces": True, "trial.serviceAccount.create": False,
                              "replicaCount": 2})
    assert not find(manifests, "Role") and not find(manifests, "RoleBinding")
    jobs = one(manifests, "ClusterRole", name="qtune-jobs")
    assert ("", "secrets", {"get"}) not in rules_of(jobs)
    cluster = one(manifests, "ClusterRole", name="qtune-cluster")
    assert ("kopf.dev", "clusterkopfpeerings", {"get", "list", "watch", "patch", "create"}) in rules_of(cluster)
    assert "--all-namespaces" in args_of(manifests)


def test_cluster_wide_mode_needs_listed_namespaces_for_trial_accounts(helm: Path) -> None:
    proc = run_helm(helm, ["template", "q", str(OPERATOR_CHART), *operator_args({"watch.allNamespaces": True})],
                    check=False)
    assert proc.returncode != 0 and "trial.serviceAccount.create" in proc.stderr


def test_trial_service_account_has_no_permissions_and_no_token(helm: Path) -> None:
    manifests = render(helm, {"watch.namespaces": ["team-a", "team-b"]})
    trial = find(manifests, "ServiceAccount", name="qtune-trial")
    assert sorted(t["metadata"]["namespace"] for t in trial) == ["team-a", "team-b"]
    assert all(t["automountServiceAccountToken"] is False for t in trial)
    for binding in [*find(manifests, "RoleBinding"), *find(manifests, "ClusterRoleBinding")]:
        assert all(s["name"] != "qtune-trial" for s in binding["subjects"])
    # pods run as their job's own account: the shared one is not a default, and jobs may name it
    # only once it is opted in
    assert "QTUNE_TRIAL_SERVICE_ACCOUNT" not in env_of(manifests)
    assert all("qtune.io/job-account" not in t["metadata"]["labels"] for t in trial)
    opted = find(render(helm, {"watch.namespaces": ["team-a"], "trial.serviceAccount.jobMayUse": True}),
                 "ServiceAccount", name="qtune-trial")
    assert [t["metadata"]["labels"]["qtune.io/job-account"] for t in opted] == ["true"]


def test_unit_pod_storage_settings(helm: Path) -> None:
    env = env_of(render(helm))
    assert (env["QTUNE_EPHEMERAL_STORAGE_REQUEST"], env["QTUNE_EPHEMERAL_STORAGE_LIMIT"],
            env["QTUNE_TMP_SIZE_LIMIT"]) == ("1Gi", "4Gi", "2Gi")
    env = env_of(render(helm, {"trial.tmpSizeLimit": "", "trial.ephemeralStorage.limit": "8Gi"}))
    assert env["QTUNE_TMP_SIZE_LIMIT"] == "none" and env["QTUNE_EPHEMERAL_STORAGE_LIMIT"] == "8Gi"
    proc = run_helm(helm, ["template", "q", str(OPERATOR_CHART), *operator_args({"trial.tmpSizeLimit": "2 GB"})],
                    check=False)
    assert proc.returncode != 0 and "tmpSizeLimit" in proc.stderr


def test_deleted_job_folders_are_cleaned_up_unless_turned_off(helm: Path) -> None:
    from qtune.operator.config import OperatorConfig

    assert env_of(render(helm))["QTUNE_CLEANUP_DELETED_JOB_FOLDERS"] == "true"
    off = env_of(render(helm, {"cleanup.deletedJobFolders": False}))["QTUNE_CLEANUP_DELETED_JOB_FOLDERS"]
    os.environ["QTUNE_CLEANUP_DELETED_JOB_FOLDERS"] = off
    try:
        assert OperatorConfig.from_env().cleanup_deleted_job_folders is False
    finally:
        del os.environ["QTUNE_CLEANUP_DELETED_JOB_FOLDERS"]


def test_the_operator_may_read_the_accounts_and_rbac_objects_it_checks(helm: Path) -> None:
    role = find(render(helm, {"watch.namespaces": ["team-a"]}), "Role")[0]
    verbs = {(group, resource): set(rule["verbs"]) for rule in role["rules"]
             for group in rule["apiGroups"] for resource in rule["resources"]}
    assert {"get", "create"} <= verbs[("", "serviceaccounts")]
    assert {"get", "create"} <= verbs[("rbac.authorization.k8s.io", "roles")]
    assert {"get", "create"} <= verbs[("rbac.authorization.k8s.io", "rolebindings")]
    # issue 20: a job's RoleBinding goes after its baseline; a workspace PVC must carry the opt-in label
    assert verbs[("rbac.authorization.k8s.io", "rolebindings")] == {"get", "create", "delete"}
    assert verbs[("rbac.authorization.k8s.io", "roles")] == {"get", "create"}
    assert verbs[("", "persistentvolumeclaims")] == {"get"}


def test_what_a_job_may_choose_reaches_the_operator(helm: Path) -> None:
    """Issue 20: the chart's defaults allow its own image only, PVCs labelled qtune.io/workspace=true and the
    dedicated pool's taint key; each value reaches the operator under the name its setting reads."""
    from qtune.operator.config import OperatorConfig

    env = env_of(render(helm))
    assert "QTUNE_ALLOWED_IMAGES" not in env  # the operator's trial image (the chart's) only
    assert env["QTUNE_WORKSPACE_CLAIM_LABEL"] == "qtune.io/workspace=true"
    assert env["QTUNE_ALLOWED_TOLERATION_KEYS"] == "qtune.io/dedicated"
    env = env_of(render(helm, {"trial.allowedImages": ["registry.example/team/*", "other:1"],
                               "trial.workspaceClaimLabel": "", "trial.allowedTolerationKeys": []}))
    assert env["QTUNE_ALLOWED_IMAGES"] == "registry.example/team/*,other:1"
    assert env["QTUNE_WORKSPACE_CLAIM_LABEL"] == "none" and env["QTUNE_ALLOWED_TOLERATION_KEYS"] == ""
    for name in ("allowed_images", "workspace_claim_label", "allowed_toleration_keys"):
        assert OperatorConfig.env_name(name) in env
    settings = {k: v for k, v in env.items() if k.startswith("QTUNE_") and isinstance(v, str)}
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, settings, clear=True):
        config = OperatorConfig.from_env()
    assert config.allowed_images == ("registry.example/team/*", "other:1")
    assert config.workspace_claim_label == "" and config.allowed_toleration_keys == ()
    proc = run_helm(helm, ["template", "q", str(OPERATOR_CHART), *operator_args(
        {"trial.workspaceClaimLabel": "no-value"})], check=False)
    assert proc.returncode != 0 and "schema" in proc.stderr


def test_the_operators_read_limits_reach_it(helm: Path) -> None:
    """Issue 20: the caps on what the operator decodes (a job's published space, a results answer) are chart
    values; their defaults are the operator's own, and a value set in the chart is what the operator reads."""
    import os
    from unittest import mock

    from qtune.operator.config import OperatorConfig

    names = {"limits.spaceBytes": "space_limit_bytes", "limits.spaceElements": "space_limit_elements",
             "limits.resultsMaxBytes": "results_max_bytes", "limits.resultsMaxSeries": "results_max_series"}
    defaults = OperatorConfig()
    env = env_of(render(helm))
    for setting in names.values():
        assert env[OperatorConfig.env_name(setting)] == str(getattr(defaults, setting))
    env = env_of(render(helm, dict.fromkeys(names, 12345)))
    settings = {k: v for k, v in env.items() if k.startswith("QTUNE_") and isinstance(v, str)}
    with mock.patch.dict(os.environ, settings, clear=True):
        config = OperatorConfig.from_env()
    assert all(getattr(config, setting) == 12345 for setting in names.values())
    proc = run_helm(helm, ["template", "q", str(OPERATOR_CHART), *operator_args({"limits.spaceBytes": 0})],
                    check=False)
    assert proc.returncode != 0 and "schema" in proc.stderr


# --------------------------------------------------------------------------- monitoring


def test_pod_and_service_monitors_are_off_by_default(helm: Path) -> None:
    manifests = render(helm)
    assert not find(manifests, "PodMonitor") and not find(manifests, "ServiceMonitor")
    on = render(helm, {"metrics.podMonitor.enabled": True, "metrics.serviceMonitor.enabled": True,
                       "metrics.serviceMonitor.labels": {"release": "kube-prometheus"}})
    pod_monitor, service_monitor = one(on, "PodMonitor"), one(on, "ServiceMonitor")
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert service_monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert service_monitor["metadata"]["labels"]["release"] == "kube-prometheus"
    service = one(on, "Service")
    assert all(service["metadata"]["labels"][k] == v for k, v in service_monitor["spec"]["selector"]["matchLabels"]
               .items())


@pytest.mark.parametrize("values", [{"replicCount": 2}, {"replicaCount": -1}, {"image.digest": "latest"},
                                    {"watch.namespaces": ["Not_A_Namespace"]}])
def test_values_schema_rejects_mistakes(helm: Path, values: dict[str, Any]) -> None:
    proc = run_helm(helm, ["template", "q", str(OPERATOR_CHART), *operator_args(values)], check=False)
    assert proc.returncode != 0 and "values don't meet the specifications of the schema" in proc.stderr, proc.stderr


def test_the_signing_key_is_generated_or_an_existing_secret(helm: Path) -> None:
    generated = render(helm)
    secrets = [m for m in generated if m["kind"] == "Secret"]
    assert [s["metadata"]["name"] for s in secrets] == ["qtune-signing-key"]
    assert secrets[0]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert env_of(generated)["QTUNE_SIGNING_KEY"] == {"secretKeyRef": {"name": "qtune-signing-key", "key": "key"}}
    # rendered ahead of time (GitOps): no key in the manifests, the operator reads the named Secret
    existing = render(helm, {"signingKey.existingSecret": "team-key"})
    assert not [m for m in existing if m["kind"] == "Secret"]
    assert env_of(existing)["QTUNE_SIGNING_KEY"] == {"secretKeyRef": {"name": "team-key", "key": "key"}}


# --------------------------------------------------------------------------- network policies (issue 12)


def unit_policies(manifests: list[Manifest], namespace: str) -> tuple[Manifest, Manifest]:
    return (one(manifests, "NetworkPolicy", name="qtune-units", namespace=namespace),
            one(manifests, "NetworkPolicy", name="qtune-baseline-apiserver", namespace=namespace))


def selects(policy: Manifest, labels: dict[str, str]) -> bool:
    selector = policy["spec"]["podSelector"]
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_unit_pods_get_no_ingress_and_egress_only_to_dns_and_the_pushgateway(helm: Path) -> None:
    from qtune.operator import constants as c
    from qtune.operator.folders import ROLE_FOLDER_CLEANUP

    manifests = render(helm, {"watch.namespaces": ["team-a", "team-b"]})
    for ns in ("team-a", "team-b"):
        units, baseline = unit_policies(manifests, ns)
        # the labels the operator puts on its pods select them; the operator itself is not selected
        for role in (c.ROLE_BASELINE, c.ROLE_TRIAL, c.ROLE_CONFIRM, c.ROLE_CLEANUP, ROLE_FOLDER_CLEANUP):
            assert selects(units, {c.LABEL_MANAGED_BY: c.MANAGED_BY, c.LABEL_ROLE: role}), role
        assert not selects(units, {c.LABEL_MANAGED_BY: c.MANAGED_BY, c.LABEL_ROLE: c.ROLE_HISTORY})
        assert not selects(units, {"app.kubernetes.io/name": "qtune", "app.kubernetes.io/component": "operator"})
        assert selects(baseline, {c.LABEL_MANAGED_BY: c.MANAGED_BY, c.LABEL_ROLE: c.ROLE_BASELINE})
        assert not selects(baseline, {c.LABEL_MANAGED_BY: c.MANAGED_BY, c.LABEL_ROLE: c.ROLE_TRIAL})
        assert not selects(baseline, {c.LABEL_MANAGED_BY: c.MANAGED_BY, c.LABEL_ROLE: c.ROLE_CONFIRM})

        assert units["spec"]["policyTypes"] == ["Ingress", "Egress"] and units["spec"]["ingress"] == []
        egress = units["spec"]["egress"]
        assert len(egress) == 2, "DNS and the Pushgateway, nothing else"
        dns, pushgateway = egress
        assert sorted((p["protocol"], p["port"]) for p in dns["ports"]) == [("TCP", 53), ("UDP", 53)]
        assert dns["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                              "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]
        assert pushgateway["ports"] == [{"protocol": "TCP", "port": 9091}]
        assert pushgateway["to"][0]["podSelector"] == {
            "matchLabels": {"app.kubernetes.io/name": "prometheus-pushgateway"}}
        for rule in egress:
            assert rule["to"] and all("ipBlock" not in peer for peer in rule["to"]), "no open egress"
        # the API server: the baseline only (it publishes its ConfigMap)
        assert baseline["spec"]["policyTypes"] == ["Egress"] and "ingress" not in baseline["spec"]
        assert sorted(p["port"] for p in baseline["spec"]["egress"][0]["ports"]) == [443, 6443]


def test_network_policy_selectors_are_values(helm: Path) -> None:
    manifests = render(helm, {
        "networkPolicy.pushgateway.to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}],
        "networkPolicy.pushgateway.port": 19091,
        "networkPolicy.dns.to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "coredns"}}}],
        "networkPolicy.apiServer.cidrs": ["172.18.0.2/32"], "networkPolicy.apiServer.ports": [6443],
        "networkPolicy.extraEgress": [{"to": [{"ipBlock": {"cidr": "10.9.9.9/32"}}],
                                       "ports": [{"protocol": "TCP", "port": 3128}]}]})
    units, baseline = unit_policies(manifests, NS)
    dns, pushgateway, proxy = units["spec"]["egress"]
    assert pushgateway == {"to": [{"ipBlock": {"cidr": "10.1.2.3/32"}}], "ports": [{"protocol": "TCP", "port": 19091}]}
    assert dns["to"][0]["podSelector"] == {"matchLabels": {"app": "coredns"}}
    assert proxy["ports"] == [{"protocol": "TCP", "port": 3128}]
    assert baseline["spec"]["egress"] == [{"to": [{"ipBlock": {"cidr": "172.18.0.2/32"}}],
                                           "ports": [{"protocol": "TCP", "port": 6443}]}]
    assert not find(render(helm, {"networkPolicy.enabled": False}), "NetworkPolicy")
    proc = run_helm(helm, ["template", "q", str(OPERATOR_CHART), *operator_args({"networkPolicy.apiServer.cidrs":
                                                                              ["kubernetes"]})], check=False)
    assert proc.returncode != 0 and "schema" in proc.stderr


def test_rendering_fails_without_the_api_servers_addresses_unless_waived(helm: Path, tmp_path: Path) -> None:
    """Issue 20: with networkPolicy.apiServer.cidrs empty the baseline pod's egress would be any address on
    443/6443; the chart refuses to render, saying what to set, unless allowAnyAddress waives it explicitly."""
    proc = run_helm(helm, ["template", "q", str(OPERATOR_CHART), "--namespace", NS], check=False)
    assert proc.returncode != 0
    assert "networkPolicy.apiServer.cidrs is empty" in proc.stderr and "kubectl get endpoints kubernetes" in proc.stderr
    assert "networkPolicy.apiServer.allowAnyAddress=true" in proc.stderr
    waived = {"networkPolicy.apiServer.cidrs": [], "networkPolicy.apiServer.allowAnyAddress": True}
    _, baseline = unit_policies(render(helm, waived), NS)
    assert baseline["spec"]["egress"][0]["to"] == [{"ipBlock": {"cidr": "0.0.0.0/0"}}]
    assert "WARNING: networkPolicy.apiServer.cidrs is empty" in notes(helm, tmp_path / "a", waived)
    assert "networkPolicy.apiServer.cidrs is empty" not in notes(helm, tmp_path / "b", {})
    assert not find(render(helm, {"networkPolicy.apiServer.cidrs": [], "networkPolicy.enabled": False}),
                    "NetworkPolicy")


def notes(helm: Path, tmp_path: Path, values: dict[str, Any]) -> str:
    """NOTES.txt as `helm install` prints it (helm template does not render it): a copy of the chart
    renders it through `tpl` into a ConfigMap."""
    import shutil

    import yaml

    chart = tmp_path / "qtune"
    shutil.copytree(OPERATOR_CHART, chart)
    (chart / "templates" / "NOTES.txt").rename(chart / "notes.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: rendered-notes\n'
        'data:\n  notes: {{ tpl (.Files.Get "notes.txt") . | quote }}\n')
    proc = run_helm(helm, ["template", "q", str(chart), "--namespace", NS, *operator_args(values),
                           "--show-only", "templates/zz-notes.yaml"])
    return yaml.safe_load(proc.stdout)["data"]["notes"]


def test_cluster_wide_rbac_is_explicit_and_warned_about(helm: Path, tmp_path: Path) -> None:
    import yaml

    defaults = yaml.safe_load((OPERATOR_CHART / "values.yaml").read_text())
    assert defaults["watch"]["allNamespaces"] is False
    assert not [r for r in find(render(helm), "ClusterRole") for _, res, _ in rules_of(r) if res == "pods"]
    assert "WARNING: watch.allNamespaces" not in notes(helm, tmp_path / "a", {})
    text = notes(helm, tmp_path / "b", {"watch.allNamespaces": True, "trial.serviceAccount.create": False})
    assert "WARNING: watch.allNamespaces is on" in text and "kube-system" in text
    # cluster-wide with namespaces listed: the policies still go to those namespaces
    manifests = render(helm, {"watch.allNamespaces": True, "trial.serviceAccount.create": False,
                              "watch.namespaces": ["team-a"]})
    assert {p["metadata"]["namespace"] for p in find(manifests, "NetworkPolicy")} == {"team-a"}


def test_allowed_strategy_modules_reach_the_operator(helm: Path) -> None:
    assert "QTUNE_ALLOWED_MODULES" not in env_of(render(helm))  # default: built-in strategies only
    env = env_of(render(helm, {"allowedModules": ["acme.strategies", "acme.more"]}))
    assert env["QTUNE_ALLOWED_MODULES"] == "acme.strategies,acme.more"
    from qtune.operator.config import OperatorConfig

    assert OperatorConfig.env_name("allowed_modules") == "QTUNE_ALLOWED_MODULES"


def test_the_readme_states_the_role_the_chart_grants(helm: Path) -> None:
    """The chart README's Role row names each resource the default Role grants with exactly its verbs (it once
    said "never Secrets" beside a Role that creates and deletes them, and kept an unused deletecollection)."""
    row = next(line for line in (OPERATOR_CHART / "README.md").read_text().splitlines()
               if line.startswith("| `Role`/`RoleBinding`"))
    stated = {res: set(verbs.split("/")) for res, verbs in re.findall(r"`([a-z/]+)` \(([a-z/]+)", row)}
    role = one(render(helm, {"watch.namespaces": ["team-a"], "peering.enabled": True}), "Role")
    granted = {resource: verbs for _, resource, verbs in rules_of(role)}
    assert stated == granted
