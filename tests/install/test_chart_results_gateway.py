"""The chart's results gateway (issue 20): off by default; when on, a Deployment and Service of `qtune
results-gateway` in front of pushgateway.url, the operator and unit pods sent to it, unit pods' egress to it
alone, and optionally a NetworkPolicy that lets only the gateway and Prometheus reach the Pushgateway."""

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


def test_the_gateway_is_off_by_default(helm: Path) -> None:
    manifests = render(helm, {"pushgateway.url": PGW})
    assert not [m for m in manifests if NAME in m["metadata"]["name"]]
    assert env_of(manifests)["QTUNE_PUSHGATEWAY_URL"] == PGW
    # on without a Pushgateway to front: nothing to run
    assert not find(render(helm, {"resultsGateway.enabled": True}), "Deployment", name=NAME)


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
                                 {"resultsGateway.readToken.key": ""}]
    for values in bad:
        proc = run_helm(helm, ["template", "q", str(OPERATOR_CHART), *operator_args(values)], check=False)
        assert proc.returncode != 0 and "schema" in proc.stderr, values


def test_notes_warn_while_the_pushgateway_is_open(helm: Path, tmp_path: Path) -> None:
    assert "WARNING: resultsGateway.enabled is false" in notes(helm, tmp_path / "a", {"pushgateway.url": PGW})
    text = notes(helm, tmp_path / "b", ON)
    assert "WARNING: resultsGateway" not in text and "pushgatewayPolicy" in text
    text = notes(helm, tmp_path / "c", {**ON, "resultsGateway.pushgatewayPolicy.enabled": True})
    assert "resultsGateway" not in text
