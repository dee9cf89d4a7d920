"""Fixtures for the cluster tests: a real Kubernetes control plane, once per session.

* ``cluster`` (session): starts the plane of ``plane.py`` (etcd, kube-apiserver,
  kube-controller-manager, kube-scheduler, the node agent, Prometheus and a Pushgateway), or
  uses the cluster of ``$KUBECONFIG`` when ``QTUNE_USE_EXISTING_CLUSTER=1``.
* ``namespace``: a fresh namespace per test (deleted afterwards).
* ``kueue`` (module): Kueue installed on the session's plane for the tests of one module, and
  uninstalled after them (webhooks, manager, CRDs), so the other modules see a plane without it.
  On an existing cluster it is used when its CRDs are there, else the test is skipped.

Every test under tests/cluster gets the ``cluster`` marker. Without the binaries (run
``tests/cluster/setup.sh``) the tests are skipped, or fail when ``QTUNE_REQUIRE_CLUSTER=1``.
Environment knobs: ``QTUNE_PLANE_KEEP_STATE=1`` keeps the state folder (logs) after the run.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import plane as plane_mod  # noqa: E402
from clusterlib import Cluster, pools_of  # noqa: E402

log = logging.getLogger("qtune.cluster_tests")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cluster: needs the Kubernetes test control plane (tests/cluster)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if os.environ.get("QTUNE_USE_EXISTING_CLUSTER") == "1" and os.environ.get("KUBECONFIG"):
        kubeconfig = Path(os.environ["KUBECONFIG"])
        c = Cluster(
            kubeconfig=kubeconfig,
            prometheus_url=os.environ.get("QTUNE_PROMETHEUS_URL"),
            pushgateway_url=os.environ.get("QTUNE_PUSHGATEWAY_URL"),
            state_dir=Path(os.environ["QTUNE_PLANE_STATE_DIR"])
            if os.environ.get("QTUNE_PLANE_STATE_DIR") else None,
            nodes=pools_of(kubeconfig),
            existing=True,
        )
        yield c
        c.close()
        return

    if missing := plane_mod.missing_binaries():
        msg = "cluster binaries missing (run tests/cluster/setup.sh): " + ", ".join(missing)
        if os.environ.get("QTUNE_REQUIRE_CLUSTER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)

    keep = os.environ.get("QTUNE_PLANE_KEEP_STATE") == "1"
    for attempt in (1, 2):  # a second try covers e.g. a free port taken by a concurrent plane
        p = plane_mod.Plane(keep_state=keep)
        try:
            p.start()
            break
        except plane_mod.PlaneError:
            if attempt == 2:
                raise
            log.warning("plane start failed, retrying once", exc_info=True)
    log.info("plane started in %.1fs (state %s)", p.startup_seconds, p.state_dir)
    saved = {k: os.environ.get(k) for k in p.env()}
    os.environ.update(p.env())
    c = Cluster(
        kubeconfig=p.kubeconfig,
        prometheus_url=p.prometheus_url,
        pushgateway_url=p.pushgateway_url,
        state_dir=p.state_dir,
        nodes=p.node_names(),
        plane=p,
    )
    try:
        yield c
    finally:
        c.close()
        p.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace for one test; deleted (not awaited) afterwards."""
    name = cluster.create_namespace()
    yield name
    cluster.delete_namespace(name)


@pytest.fixture(scope="module")
def kueue(cluster: Cluster) -> Iterator[Any]:
    """Kueue on the plane (``kueue.Kueue``; None on an existing cluster that has Kueue installed)."""
    if cluster.plane is None:
        from kubernetes import client

        try:
            client.ApiextensionsV1Api(cluster.api_client()).read_custom_resource_definition(
                "workloads.kueue.x-k8s.io")
        except client.ApiException as e:
            if e.status == 404:
                pytest.skip("the existing cluster has no Kueue (workloads.kueue.x-k8s.io)")
            raise
        yield None
        return
    import kueue as kueue_mod

    try:
        inst = cluster.plane.start_kueue()
    except kueue_mod.KueueError as e:
        if os.environ.get("QTUNE_REQUIRE_CLUSTER") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))
    log.info("Kueue started in %.1fs", inst.startup_seconds)
    try:
        yield inst
    finally:
        cluster.plane.stop_kueue()
