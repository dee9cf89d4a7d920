"""The chart's results gateway (issue 20): on by default (with pushgateway.url set), a Deployment and Service of
`qtune results-gateway` in front of pushgateway.url, the operator and unit pods sent to it, unit pods' egress to it
alone, and optionally a NetworkPolicy that lets only the gateway and Prometheus reach the Pushgateway.
resultsGateway.enabled=false renders the direct way, with a warning."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from helm_support import OPERATOR_CHART, Manifest, find, helm_binary, one, operator_container, run_helm
from test_charts import NS, env_of, notes, operator_args, render, selects, unit_policies

from qtune.operator import gateway as gw

PGW = "http://pushgateway.monitoring:9091"
ON = {"pushgateway.url": PGW, "resultsGateway.enabled": True}
NAME = "qtune-results-gateway"


@pytest.fixture(scope="module")
def helm() -> Path:
    helm = helm_binary()
    if helm is None:
        if os.environ.get("QTUNE_REQUIRE_HELM") == "1":
            pytest.fail("helm not built: run bash tests/install/build_helm.sh")
        pytest.skip("helm not built: run bash tests/install/build_helm.sh")
    return helm


def gateway_container(manifests: list[Manifest]) -> Manifest:
    deployment = one(manifests, "Deployment", name=NAME, namespace=NS)
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def unit_pod_push_urls(manifests: list[Manifest], monkeypatch: pytest.MonkeyPatch) -> set[str | None]:
    """Where a unit pod the operator would start pushes (its env and `--pushgateway` argument), the operator
    configured from the chart's environment as in its container."""
    from qtune.operator import builders
    from qtune.operator import constants as c
    from qtune.operator.config import OperatorConfig
    from qtune.operator.layout import JobRef
    from qtune.operator.reconcile import validate

    for name in [n for n in os.environ if n.startswith("QTUNE_")]:
        monkeypatch.delenv(name)
    for name, value in env_of(manifests).items():
        if name.startswith("QTUNE_") and isinstance(value, str):
            monkeypatch.setenv(name, value)
    body = {"apiVersion": c.API_VERSION, "kind": c.KIND,
            "metadata": {"name": "digits", "namespace": "ml", "uid": "0b6c7f5e-8d1a-4c2e-9f00-123456789abc"},
            "spec": {"model": {"framework": "onnxruntime", "path": "model.onnx"},
                     "data": {"calibration": {"path": "calib.npz"}, "evaluation": {"path": "eval.npz"}},
                     "trial": {"resources": {"cpu": 2, "memory": "1Gi"}},
                     "workspace": {"persistentVolumeClaim": "work", "mountPath": "/workspace"}}}
    spec, _ = validate(body)
    plan = builders.UnitPlan(unit="trial-0", attempt=0, trial=0, tune_config={})
    container = builders.unit_pod(JobRef.from_body(body), spec, plan, OperatorConfig.from_env())["spec"][
        "containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    args = container["args"]
    pushed_to = args[args.index("--pushgateway") + 1] if "--pushgateway" in args else None
    return {env.get("QTUNE_PUSHGATEWAY_URL"), pushed_to}


def test_the_gateway_is_on_by_default(helm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = render(helm, {"pushgateway.url": PGW})
    gateway_container(manifests)
    one(manifests, "Service", name=NAME, namespace=NS)
    url = f"http://{NAME}.{NS}.svc:9091"
    assert env_of(manifests)["QTUNE_PUSHGATEWAY_URL"] == url
    assert unit_pod_push_urls(manifests, monkeypatch) == {url}, "unit pods push through the gateway"
    units, _ = unit_policies(manifests, NS)
    assert units["spec"]["egress"][1]["ports"] == [{"protocol": "TCP", "port": 9091}]
    assert units["spec"]["egress"][1]["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == \
        "results-gateway"


def test_without_a_pushgateway_no_gateway_is_created(helm: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The defaults (plus the API server's addresses, which the chart requires) render: nothing to front, so no
    gateway, no push address, and NOTES says so."""
    manifests = render(helm)
    assert not [m for m in manifests if NAME in m["metadata"]["name"]]
    assert "QTUNE_PUSHGATEWAY_URL" not in env_of(manifests)
    assert unit_pod_push_urls(manifests, monkeypatch) == {None}
    assert "no results gateway was created" in notes(helm, tmp_path, {})


def test_off_renders_the_direct_way_with_a_warning(helm: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    values = {"pushgateway.url": PGW, "resultsGateway.enabled": False}
    manifests = render(helm, values)
    assert not [m for m in manifests if NAME in m["metadata"]["name"]]
    assert env_of(manifests)["QTUNE_PUSHGATEWAY_URL"] == PGW
    assert unit_pod_push_urls(manifests, monkeypatch) == {PGW}
    units, _ = unit_policies(manifests, NS)
    assert units["spec"]["egress"][1]["to"][0]["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/name": "prometheus-pushgateway"}}
    assert "WARNING: resultsGateway.enabled is false" in notes(helm, tmp_path, values)


def test_pods_never_push_round_the_gateway(helm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pushgateway.podUrl would send unit pods straight to the Pushgateway: refused while the gateway runs;
    resultsGateway.url is the address of the gateway itself (for pods without cluster DNS)."""
    proc = run_helm(helm, ["template", "q", str(OPERATOR_CHART), *operator_args(
        {"pushgateway.url": PGW, "pushgateway.podUrl": "http://10.0.0.5:9091"})], check=False)
    assert proc.returncode != 0 and "pushgateway.podUrl is set while the results gateway runs" in proc.stderr
    direct = render(helm, {"pushgateway.url": PGW, "pushgateway.podUrl": "http://10.0.0.5:9091",
                           "resultsGateway.enabled": False})
    assert unit_pod_push_urls(direct, monkeypatch) == {"http://10.0.0.5:9091"}
    manifests = render(helm, {"pushgateway.url": PGW, "resultsGateway.url": "http://10.0.0.7:9091"})
    assert env_of(manifests)["QTUNE_PUSHGATEWAY_URL"] == "http://10.0.0.7:9091"
    assert unit_pod_push_urls(manifests, monkeypatch) == {"http://10.0.0.7:9091"}
    gateway_container(manifests)


def test_the_gateway_fronts_the_pushgateway_with_the_operators_key(helm: Path) -> None:
    manifests = render(helm, ON)
    container = gateway_container(manifests)
    assert container["command"] == ["qtune"] and container["args"][0] == "results-gateway"
    args = gw.build_parser().parse_args(container["args"][1:])  # what the real CLI accepts
    assert args.upstream == PGW and args.port == 9091 and args.max_body_bytes == 256 * 1024
    assert container["image"] == operator_container(manifests)["image"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["QTUNE_SIGNING_KEY"] == env_of(manifests)["QTUNE_SIGNING_KEY"], "the operator's Secret"
    assert "QTUNE_RESULTS_READ_TOKEN" not in env
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    pod = one(manifests, "Deployment", name=NAME)["spec"]["template"]
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    service = one(manifests, "Service", name=NAME, namespace=NS)
    assert service["spec"]["ports"][0]["port"] == 9091
    assert all(pod["metadata"]["labels"][k] == v for k, v in service["spec"]["selector"].items())
    # the operator deletes and lists through it; unit pods push through it (podUrl defaults to the operator's)
    assert env_of(manifests)["QTUNE_PUSHGATEWAY_URL"] == f"http://{NAME}.{NS}.svc:9091"
    assert "QTUNE_POD_PUSHGATEWAY_URL" not in env_of(manifests)
    # the operator's own pods are not the gateway's: the Services select apart
    operator_labels = one(manifests, "Deployment", name="qtune")["spec"]["template"]["metadata"]["labels"]
    assert not all(operator_labels.get(k) == v for k, v in service["spec"]["selector"].items())


def test_prometheus_reads_with_its_own_token(helm: Path) -> None:
    container = gateway_container(render(helm, {**ON, "resultsGateway.readToken.existingSecret": "prom-read"}))
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["QTUNE_RESULTS_READ_TOKEN"] == {"secretKeyRef": {"name": "prom-read", "key": "token"}}


def test_unit_pods_reach_the_gateway_and_not_the_pushgateway(helm: Path) -> None:
    manifests = render(helm, {**ON, "watch.namespaces": ["team-a", "team-b"]})
    gateway_labels = one(manifests, "Deployment", name=NAME)["spec"]["template"]["metadata"]["labels"]
    for ns in ("team-a", "team-b"):
        units, _ = unit_policies(manifests, ns)
        dns, results = units["spec"]["egress"]
        assert results["ports"] == [{"protocol": "TCP", "port": 9091}]
        (peer,) = results["to"]
        assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": NS}}
        assert selects({"spec": {"podSelector": peer["podSelector"]}}, gateway_labels)
        assert not selects({"spec": {"podSelector": peer["podSelector"]}},
                           {"app.kubernetes.io/name": "prometheus-pushgateway"})


def test_the_pushgateway_policy_admits_only_the_gateway_and_prometheus(helm: Path) -> None:
    assert not find(render(helm, ON), "NetworkPolicy", namespace="monitoring"), "off by default"
    manifests = render(helm, {**ON, "resultsGateway.pushgatewayPolicy.enabled": True})
    policy = one(manifests, "NetworkPolicy", namespace="monitoring")
    assert selects(policy, {"app.kubernetes.io/name": "prometheus-pushgateway"})
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    gateway, prometheus = rule["from"]
    gateway_labels = one(manifests, "Deployment", name=NAME)["spec"]["template"]["metadata"]["labels"]
    assert gateway["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": NS}}
    assert selects({"spec": {"podSelector": gateway["podSelector"]}}, gateway_labels)
    assert prometheus["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}
    assert rule["ports"] == [{"protocol": "TCP", "port": 9091}]


def test_the_gateway_values_are_checked(helm: Path) -> None:
    bad: list[dict[str, Any]] = [{"resultsGateway.port": 0}, {"resultsGateway.enabld": True},
                                 {"resultsGateway.readToken.key": ""}, {"resultsGateway.url": "gateway:9091"}]
    for values in bad:
        proc = run_helm(helm, ["template", "q", str(OPERATOR_CHART), *operator_args(values)], check=False)
        assert proc.returncode != 0 and "schema" in proc.stderr, values


def test_notes_warn_while_the_pushgateway_is_open(helm: Path, tmp_path: Path) -> None:
    assert "WARNING: resultsGateway" not in notes(helm, tmp_path / "a", {"pushgateway.url": PGW}), "on by default"
    text = notes(helm, tmp_path / "b", ON)
    assert "WARNING: resultsGateway" not in text and "pushgatewayPolicy" in text
    text = notes(helm, tmp_path / "c", {**ON, "resultsGateway.pushgatewayPolicy.enabled": True})
    assert "resultsGateway" not in text
