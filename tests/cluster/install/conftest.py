"""Fixtures of the install tests on the test control plane: the charts installed with helm.

``release`` (module scope) installs, as the cluster admin would, with the helm that
tests/install/build_helm.sh builds:

* ``qtune-crds`` (the CRDs),
* ``qtune`` into a fresh operator namespace, serving one fresh job namespace, with the plane's
  Prometheus and Pushgateway, and ``replicaCount=0``: the tests run the operator themselves, as a
  local process whose only credential is a token of the chart's ServiceAccount (never the admin's),
  with the arguments and environment of the chart's own Deployment. The results gateway is turned
  off here (the plane has no cluster DNS: see the fixture); test_real_containers.py covers it.

A third namespace, served by nobody, is there to prove what the operator may NOT do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTALL_TESTS = Path(__file__).resolve().parents[2] / "install"
if str(INSTALL_TESTS) not in sys.path:
    sys.path.insert(0, str(INSTALL_TESTS))

from clusterlib import Cluster, wait_for  # noqa: E402
from helm_support import CRD_CHART, OPERATOR_CHART, helm_binary, run_helm, set_args  # noqa: E402
from install_cluster import OperatorProcess, Release, api_server_values, chart_command, free_port  # noqa: E402

log = logging.getLogger("qtune.tests.install")

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def helm() -> Path:
    helm = helm_binary()
    if helm is None:
        message = "helm not built: run bash tests/install/build_helm.sh"
        if os.environ.get("QTUNE_REQUIRE_HELM") == "1" or os.environ.get("QTUNE_REQUIRE_CLUSTER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return helm


def adopt_existing_crds(cluster: Cluster, release: str, namespace: str) -> None:
    """CRDs applied earlier in the session (e.g. by the operator tests) are adopted into the chart's
    release the way Helm documents it (its ownership label and annotations), as a platform team
    moving hand-applied CRDs under Helm would."""
    from kubernetes import client

    api = client.ApiextensionsV1Api(cluster.api_client())
    patch = {"metadata": {"labels": {"app.kubernetes.io/managed-by": "Helm"},
                          "annotations": {"meta.helm.sh/release-name": release,
                                          "meta.helm.sh/release-namespace": namespace}}}
    for crd in api.list_custom_resource_definition().items:
        if crd.spec.group in ("qtune.io", "kopf.dev"):
            api.patch_custom_resource_definition(crd.metadata.name, patch)


@pytest.fixture(scope="module")
def release(cluster: Cluster, helm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    suffix = uuid.uuid4().hex[:6]
    names = [cluster.create_namespace(prefix=f"{p}-{suffix}-") for p in ("qtune-system", "qtune-jobs", "other")]
    values = {"watch.namespaces": [names[1]], "replicaCount": 0,
              "prometheus.url": cluster.prometheus_url or "", "pushgateway.url": cluster.pushgateway_url or "",
              # The results gateway (on by default) cannot serve on this plane: its pod would run as a process of
              # this host on the host's port 9091, and the operator and unit pods would push to its Service's name,
              # which nothing here resolves (no cluster DNS, no Service proxy). Pods push to the plane's
              # Pushgateway directly; test_real_containers.py runs the gateway on the real node.
              "resultsGateway.enabled": False,
              "operator.logLevel": "DEBUG", **api_server_values(cluster)}
    rel = Release(cluster, helm, names[0], names[1], names[2], values, tmp=tmp_path_factory.mktemp("install"))
    crds_release = f"qtune-crds-{suffix}"
    adopt_existing_crds(cluster, crds_release, names[0])
    t0 = time.monotonic()
    run_helm(helm, rel.helm_args("install", crds_release, str(CRD_CHART), "--namespace", names[0], "--wait",
                                 "--timeout", "120s"))
    run_helm(helm, rel.helm_args("install", rel.release, str(OPERATOR_CHART), "--namespace", names[0], "--wait",
                                 "--timeout", "120s", *set_args(values)))
    log.info("helm install of both charts: %.1fs", time.monotonic() - t0)
    try:
        yield rel
    finally:
        for name in (rel.release, crds_release):
            run_helm(helm, rel.helm_args("uninstall", name, "--namespace", names[0], "--wait", "--timeout", "60s"),
                     check=False)
        for name in names:
            cluster.delete_namespace(name)


@pytest.fixture
def operator(release: Release) -> Iterator[OperatorProcess]:
    """`qtune operator` as the chart runs it, authenticated by a token of the chart's ServiceAccount."""
    health_port, metrics_port = free_port(), free_port()
    args, chart_env = chart_command(release, health_port, metrics_port)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KUBERNETES_", "QTUNE_PROMETHEUS", "QTUNE_PUSHGATEWAY"))}
    env.update(chart_env)
    env["HOME"] = str(release.tmp)  # the chart sets /tmp; keep this run's files in its own folder
    env["KUBECONFIG"] = str(release.token_kubeconfig())
    log_path = release.tmp / "operator.log"
    argv = [sys.executable, "-m", "qtune.cli.main", *args]
    log.info("starting %s", " ".join(argv))
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=release.tmp, start_new_session=True)
    op = OperatorProcess(proc, log_path, health_port, metrics_port)
    try:
        import requests

        def healthy() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"the operator exited with {proc.returncode}:\n{op.log()[-4000:]}")
            with contextlib.suppress(requests.RequestException):
                return requests.get(f"http://127.0.0.1:{health_port}/healthz", timeout=2).status_code == 200
            return False

        wait_for(healthy, 60, "the operator's /healthz", detail=lambda: op.log()[-2000:], interval=0.5)
        yield op
    finally:
        op.stop()
        log.info("operator log tail:\n%s", op.log()[-3000:])
