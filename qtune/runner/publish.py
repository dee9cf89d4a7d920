"""Publish the baseline step's results (space.json, baseline.json) to a ConfigMap.

The operator does not mount the job's PVC, so the baseline pod hands it the two small documents
it needs to drive the tuning: `python -m qtune.runner baseline ... --publish-configmap NAME`.
The operator creates the ConfigMap (empty, owned by the job) and a ServiceAccount whose Role
allows get/update/patch of that one ConfigMap; this module merge-patches its data in.

Documents are stored with the protocol's ConfigMap codec (qtune.protocol.encode_document): plain
JSON under `data`, larger ones gzip-compressed under `binaryData["<name>.gz"]`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from qtune import protocol
from qtune.spec.errors import QtuneError

logger = logging.getLogger(__name__)

SPACE = "space.json"
FILES = (SPACE, "baseline.json")
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def current_namespace() -> str:
    namespace = os.environ.get("QTUNE_NAMESPACE") or os.environ.get("POD_NAMESPACE")
    if namespace:
        return namespace
    try:
        return NAMESPACE_FILE.read_text().strip()
    except OSError:
        raise QtuneError("--publish-configmap: cannot tell the namespace (set QTUNE_NAMESPACE)") from None


def configmap_patch(workspace: Path, files: tuple[str, ...] = FILES) -> dict[str, Any]:
    """The merge patch carrying the files (qtune.protocol's ConfigMap codec: plain JSON, or
    gzip+base64 when large; the other form of each key is removed)."""
    data: dict[str, str | None] = {}
    binary: dict[str, str | None] = {}
    for name in files:
        path = workspace / name
        if not path.is_file():
            raise QtuneError(f"--publish-configmap: {path} does not exist")
        try:
            plain, packed = protocol.encode_document(name, json.loads(path.read_text()))
        except protocol.PayloadTooLarge as exc:
            raise QtuneError(f"--publish-configmap: {exc}") from None
        data[name], binary[f"{name}.gz"] = plain.get(name), packed.get(f"{name}.gz")
    size = sum(len(v) for v in (*data.values(), *binary.values()) if v)
    if size > protocol.CONFIGMAP_LIMIT:
        raise QtuneError(f"--publish-configmap: {size} bytes do not fit in a ConfigMap (1 MiB)")
    return {"data": data, "binaryData": binary}


def _api() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CoreV1Api()


def space_sha256(patch: dict[str, Any]) -> str:
    """sha256 of space.json's value exactly as the patch stores it (plain JSON or base64 gzip): the baseline's
    signed result carries it, and the operator decodes the published space only when the stored value has it."""
    value = patch["binaryData"].get(f"{SPACE}.gz") or patch["data"].get(SPACE)
    return protocol.value_sha256(str(value))


def publish_baseline(configmap: str, workspace: Path, namespace: str | None = None, attempts: int = 5) -> str:
    """Merge-patch space.json and baseline.json of `workspace` into ConfigMap `configmap`; the sha256 of the
    space's stored value (`space_sha256`)."""
    from kubernetes.client import ApiException

    patch = configmap_patch(Path(workspace))
    digest = space_sha256(patch)
    namespace = namespace or current_namespace()
    api = _api()
    for attempt in range(1, attempts + 1):
        try:
            api.patch_namespaced_config_map(configmap, namespace, patch)
            logger.info("published %s to ConfigMap %s/%s", ", ".join(FILES), namespace, configmap)
            return digest
        except ApiException as exc:
            if exc.status in (401, 403, 404) or attempt == attempts:
                raise QtuneError(f"--publish-configmap: cannot update ConfigMap {namespace}/{configmap}: "
                                 f"HTTP {exc.status} {exc.reason}") from None
        except OSError as exc:
            if attempt == attempts:
                raise QtuneError(f"--publish-configmap: {exc}") from None
        time.sleep(min(2.0 * attempt, 10.0))
    raise QtuneError(f"--publish-configmap: cannot update ConfigMap {namespace}/{configmap}")  # attempts < 1
