"""Async access to the Kubernetes API for the operator's own writes.

The official client is synchronous, so every call runs in a worker thread (the Kube's own pool):
the event loop never waits on the API server. Objects go in and come out as plain dicts
(camelCase, as the API serves them). Watching is Kopf's job (handlers and the pod index).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import urllib3
from kubernetes import client, config

from qtune.operator import constants as c

logger = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
T = TypeVar("T")


class Conflict(RuntimeError):
    """The object changed since it was read (HTTP 409 on update): read it again."""


def load_client(kubeconfig: str | None = None, pool_size: int = 32) -> client.ApiClient:
    """In-cluster credentials when running in a pod, else the kubeconfig ($KUBECONFIG)."""
    configuration = client.Configuration()
    try:
        if kubeconfig:
            raise config.ConfigException("kubeconfig given")
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)


def _raw(response: Any) -> dict[str, Any]:
    data = response.data if hasattr(response, "data") else response
    return json.loads(data) if data else {}


def _read_and_release(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call `fn`; a raw response (`_preload_content=False`) is read whole (`.data` keeps it) and its connection
    goes back to the pool. Unreleased, every such call left its connection behind and the next one opened a
    new TLS connection: in the 100-job scale run, TLS handshakes were the operator's largest CPU cost."""
    response = fn(*args, **kwargs)
    if isinstance(response, urllib3.BaseHTTPResponse):
        _ = response.data
        response.release_conn()
    return response


class Kube:
    """The calls the reconciler and handlers make, each awaited without blocking the loop."""

    def __init__(self, api: client.ApiClient, threads: int = 32) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        # own threads (not the loop's small default pool): many jobs' calls wait on I/O at once
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="qtune-kube")

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(_read_and_release, fn, *args, **kwargs))

    async def _call_or_none(self, tolerated: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """`_call`, but None instead of ApiException when the API answers `tolerated` (404: gone,
        409: exists), which makes creates and deletes idempotent."""
        try:
            return await self._call(fn, *args, **kwargs)
        except client.ApiException as exc:
            if exc.status == tolerated:
                return None
            raise

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.api.close()

    # ---- pods
    async def create_pod(self, body: dict[str, Any]) -> bool:
        """Create a pod; False when a pod of that name already exists (idempotent)."""
        response = await self._call_or_none(409, self.core.create_namespaced_pod, body["metadata"]["namespace"],
                                            body, _preload_content=False)
        return response is not None

    async def delete_pod(self, namespace: str, name: str, grace_seconds: int | None = None) -> bool:
        """Delete a pod; False when it was already gone."""
        response = await self._call_or_none(404, self.core.delete_namespaced_pod, name, namespace,
                                            grace_period_seconds=grace_seconds, _preload_content=False)
        return response is not None

    async def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        response = await self._call(self.core.list_namespaced_pod, namespace, label_selector=selector,
                                    _preload_content=False)
        return list(_raw(response).get("items") or [])

    async def list_custom(self, group: str, version: str, namespace: str, plural: str) -> dict[str, Any]:
        """A namespace's custom objects of one kind (Kueue's Workloads: qtune/operator/queueing.py)."""
        response = await self._call(self.custom.list_namespaced_custom_object, group, version, namespace, plural,
                                    _preload_content=False)
        return _raw(response)

    async def read_node(self, name: str) -> dict[str, Any] | None:
        """The Node object, None when it no longer exists."""
        response = await self._call_or_none(404, self.core.read_node, name, _preload_content=False)
        return None if response is None else _raw(response)

    # ---- config maps
    async def read_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        response = await self._call_or_none(404, self.core.read_namespaced_config_map, name, namespace,
                                            _preload_content=False)
        return None if response is None else _raw(response)

    async def create_configmap(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create; raises Conflict when it exists already."""
        try:
            response = await self._call(self.core.create_namespaced_config_map, body["metadata"]["namespace"],
                                        body, _preload_content=False)
        except client.ApiException as exc:
            if exc.status == 409:
                raise Conflict(f"configmap {body['metadata']['name']} exists") from exc
            raise
        return _raw(response)

    async def replace_configmap(self, body: dict[str, Any]) -> dict[str, Any]:
        """Replace (metadata.resourceVersion guards against lost updates); Conflict on a race."""
        meta = body["metadata"]
        try:
            response = await self._call(self.core.replace_namespaced_config_map, meta["name"], meta["namespace"],
                                        body, _preload_content=False)
        except client.ApiException as exc:
            if exc.status in (409, 404):
                raise Conflict(f"configmap {meta['name']} changed or vanished") from exc
            raise
        return _raw(response)

    # ---- anything to create once (ServiceAccount, Role, RoleBinding, ConfigMap, Secret)
    async def ensure(self, body: dict[str, Any]) -> bool:
        """Create the object unless it exists; True when it was created. (Secrets are only ever
        created and deleted: the operator has no right to read them.)"""
        kind, namespace = body["kind"], body["metadata"]["namespace"]
        create = {
            "ServiceAccount": self.core.create_namespaced_service_account,
            "ConfigMap": self.core.create_namespaced_config_map,
            "Secret": self.core.create_namespaced_secret,
            "Role": self.rbac.create_namespaced_role,
            "RoleBinding": self.rbac.create_namespaced_role_binding,
        }[kind]
        return await self._call_or_none(409, create, namespace, body, _preload_content=False) is not None

    async def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A ServiceAccount, Role, RoleBinding or PersistentVolumeClaim as stored (None when absent): who owns
        an object `ensure` found existing, whether a named ServiceAccount or a workspace PVC is opted in."""
        read = {
            "ServiceAccount": self.core.read_namespaced_service_account,
            "Role": self.rbac.read_namespaced_role,
            "RoleBinding": self.rbac.read_namespaced_role_binding,
            "PersistentVolumeClaim": self.core.read_namespaced_persistent_volume_claim,
        }[kind]
        response = await self._call_or_none(404, read, name, namespace, _preload_content=False)
        return None if response is None else _raw(response)

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete a ConfigMap, Secret or RoleBinding; False when it was already gone."""
        delete = {"ConfigMap": self.core.delete_namespaced_config_map,
                  "Secret": self.core.delete_namespaced_secret,
                  "RoleBinding": self.rbac.delete_namespaced_role_binding}[kind]
        return await self._call_or_none(404, delete, name, namespace, _preload_content=False) is not None

    # ---- the job
    async def patch_job_status(self, namespace: str, name: str, patch: dict[str, Any]) -> bool:
        """Merge-patch the status subresource; False when the job is gone."""
        response = await self._call_or_none(404, self.custom.patch_namespaced_custom_object_status, c.GROUP,
                                            c.VERSION, namespace, c.PLURAL, name, {"status": patch},
                                            _content_type=MERGE_PATCH, _preload_content=False)
        return response is not None

    async def job_uids(self, namespaces: list[str] | None = None) -> set[str]:
        """uids of the QuantizationJobs that exist (cluster-wide, or in `namespaces`)."""
        if namespaces is None:
            responses = [await self._call(self.custom.list_cluster_custom_object, c.GROUP, c.VERSION, c.PLURAL,
                                          _preload_content=False)]
        else:
            responses = [await self._call(self.custom.list_namespaced_custom_object, c.GROUP, c.VERSION, ns,
                                          c.PLURAL, _preload_content=False) for ns in namespaces]
        return {str((item.get("metadata") or {}).get("uid")) for response in responses
                for item in _raw(response).get("items") or []}

    # ---- Kopf peering objects
    async def ensure_peering(self, name: str, namespaces: list[str] | None) -> None:
        """Create the (Cluster)KopfPeering object Kopf's peering needs, if missing."""
        if namespaces is None:
            targets: list[tuple[str | None, str, str]] = [(None, "clusterkopfpeerings", "ClusterKopfPeering")]
        else:
            targets = [(ns, "kopfpeerings", "KopfPeering") for ns in namespaces]
        for namespace, plural, kind in targets:
            body: dict[str, Any] = {"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": {"name": name}}
            if namespace is None:
                await self._call_or_none(409, self.custom.create_cluster_custom_object, "kopf.dev", "v1", plural,
                                         body, _preload_content=False)
            else:
                body["metadata"]["namespace"] = namespace
                await self._call_or_none(409, self.custom.create_namespaced_custom_object, "kopf.dev", "v1",
                                         namespace, plural, body, _preload_content=False)
