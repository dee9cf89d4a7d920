"""Fixtures for the cluster tests: a real Kubernetes control plane, once per session.

* ``cluster`` (session): starts the plane of ``plane.py`` (etcd, kube-apiserver,
  kube-controller-manager, kube-scheduler, the node agent, Prometheus and a Pushgateway), or
  uses the cluster of ``$KUBECONFIG`` when ``QTUNE_USE_EXISTING_CLUSTER=1``.
* ``namespace``: a fresh namespace per test (deleted afterwards).

Every test under tests/cluster gets the ``cluster`` marker. Without the binaries (run
``tests/cluster/setup.sh``) the tests are skipped, or fail when ``QTUNE_REQUIRE_CLUSTER=1``.
Environment knobs: ``QTUNE_PLANE_KEEP_STATE=1`` keeps the state folder (logs) after the run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import plane as plane_mod  # noqa: E402

log = logging.getLogger("qtune.cluster_tests")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cluster: needs the Kubernetes test control plane (tests/cluster)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.cluster)


@dataclass
class Cluster:
    """What a cluster test gets: where the cluster is and a few helpers."""

    kubeconfig: Path
    prometheus_url: str | None
    pushgateway_url: str | None
    state_dir: Path | None
    nodes: dict[str, list[str]]  # pool ("xeon", "amd", "dedicated") -> node names
    existing: bool = False
    plane: plane_mod.Plane | None = None
    _clients: list[Any] = field(default_factory=list, repr=False)

    def api_client(self) -> Any:
        """A new admin ``kubernetes.client.ApiClient`` (closed at the end of the session)."""
        from kubernetes import config

        api = config.new_client_from_config(config_file=str(self.kubeconfig))
        self._clients.append(api)
        return api

    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api_client())

    def close(self) -> None:
        for api in self._clients:
            with contextlib.suppress(Exception):
                api.close()
        self._clients.clear()

    # ---- namespaces
    def create_namespace(self, prefix: str = "qtune-test-", timeout: float = 60.0) -> str:
        """Create a namespace and wait until its default ServiceAccount exists."""
        from kubernetes import client

        core = self.core()
        name = f"{prefix}{uuid.uuid4().hex[:8]}"
        core.create_namespace({"apiVersion": "v1", "kind": "Namespace",
                               "metadata": {"name": name, "labels": {"qtune.io/test": "true"}}})

        def has_sa() -> bool:
            try:
                core.read_namespaced_service_account("default", name)
                return True
            except client.ApiException as e:
                if e.status == 404:
                    return False
                raise

        wait_for(has_sa, timeout, f"default ServiceAccount in {name}")
        return name

    def delete_namespace(self, name: str, wait: bool = False, timeout: float = 120.0) -> None:
        from kubernetes import client

        core = self.core()
        with contextlib.suppress(client.ApiException):
            core.delete_namespace(name)
        if wait:
            def gone() -> bool:
                try:
                    core.read_namespace(name)
                    return False
                except client.ApiException as e:
                    return e.status == 404

            wait_for(gone, timeout, f"namespace {name} deleted")

    # ---- pods
    def wait_for_pod(self, namespace: str, name: str, done: Callable[[Any], bool] | None = None,
                     timeout: float = 60.0) -> Any:
        """Poll a pod until ``done(pod)`` (default: phase Succeeded/Failed); return it."""
        core = self.core()
        done = done or (lambda p: p.status.phase in ("Succeeded", "Failed"))
        result: list[Any] = []

        def check() -> bool:
            pod = core.read_namespaced_pod(name, namespace)
            result[:] = [pod]
            return bool(done(pod))

        wait_for(check, timeout, f"pod {namespace}/{name}",
                 detail=lambda: repr(result[0].status) if result else "")
        return result[0]

    def pod_log(self, namespace: str, name: str) -> str:
        """The pod's output: the node agent's log file, or the kubelet API on a real cluster."""
        if self.state_dir is not None and not self.existing:
            runs = sorted((self.state_dir / "agent" / "pods" / namespace / name).glob("*/*.log"),
                          key=lambda p: p.stat().st_mtime)
            return runs[-1].read_text(errors="replace") if runs else ""
        return str(self.core().read_namespaced_pod_log(name, namespace))


def wait_for(ok: Callable[[], bool], timeout: float, what: str,
             detail: Callable[[], str] | None = None, interval: float = 0.2) -> None:
    """Poll ``ok()`` until true; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}"
                        + (f": {detail()}" if detail else ""))
        time.sleep(interval)


def _pools_of(kubeconfig: Path) -> dict[str, list[str]]:
    """Node names by pool on an existing cluster (label qtune.io/pool, else NFD labels)."""
    from kubernetes import client, config

    with config.new_client_from_config(config_file=str(kubeconfig)) as api:
        pools: dict[str, list[str]] = {}
        for node in client.CoreV1Api(api).list_node().items:
            labels = node.metadata.labels or {}
            pool = labels.get("qtune.io/pool")
            if pool is None:
                vendor = labels.get(f"{plane_mod.NFD}/cpu-model.vendor_id", "")
                pool = "dedicated" if node.spec.taints else {"Intel": "xeon", "AMD": "amd"}.get(
                    vendor, "other")
            pools.setdefault(pool, []).append(node.metadata.name)
        return pools


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
            nodes=_pools_of(kubeconfig),
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

    p = plane_mod.Plane(keep_state=os.environ.get("QTUNE_PLANE_KEEP_STATE") == "1")
    p.start()
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
