"""Helpers the cluster tests share: the ``Cluster`` handle the ``cluster`` fixture yields."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plane as plane_mod
import pytest


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

    @property
    def local_agent(self) -> bool:
        """Whether pods run as local processes under this plane's node agent (host checks)."""
        return self.state_dir is not None and (self.state_dir / "agent").is_dir()

    @property
    def mount_namespace(self) -> bool:
        """Whether pods see their volumes at their mountPaths (else paths are rewritten)."""
        if not self.local_agent:
            return True
        assert self.state_dir is not None
        info = json.loads((self.state_dir / "agent" / "agent.json").read_text())
        return bool(info["mount_namespace"])

    def pod_log(self, namespace: str, name: str) -> str:
        """The pod's output: the node agent's log file, or the kubelet API on a real cluster."""
        if self.local_agent:
            assert self.state_dir is not None
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


def pools_of(kubeconfig: Path) -> dict[str, list[str]]:
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
