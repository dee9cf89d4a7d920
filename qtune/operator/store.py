"""The job history in a ConfigMap `<job>-history` owned by the job (deleted with it).

The history is the record of truth: a trial is added (pending) BEFORE its pod is created and its
result is recorded BEFORE its pod and Pushgateway group are deleted, so after an operator
restart no trial index is used twice and no finished trial runs again.

Small histories are stored as plain JSON (`data["history.json"]`, readable with kubectl);
larger ones gzip-compressed in `binaryData["history.json.gz"]` (base64 in the API). Updates carry
the resourceVersion they were based on, so a concurrent writer is detected (Conflict), never
silently overwritten.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
from dataclasses import dataclass
from typing import Any

from qtune.operator import constants as c
from qtune.operator.kube import Kube
from qtune.operator.pods import JobRef, configmap
from qtune.tuning.history import History

logger = logging.getLogger(__name__)

CONFIGMAP_LIMIT = 1024 * 1024 - 16 * 1024
"""A ConfigMap holds at most 1 MiB; keep a margin for metadata."""


class HistoryTooLarge(RuntimeError):
    """Even compressed, the history does not fit in a ConfigMap."""


def encode_history(history: History, plain_limit: int = 256 * 1024) -> tuple[dict[str, str], dict[str, str]]:
    """(data, binaryData) of the history ConfigMap."""
    text = json.dumps(history.to_dict(), separators=(",", ":"), sort_keys=True)
    if len(text.encode()) <= plain_limit:
        return {c.HISTORY_KEY: text}, {}
    packed = base64.b64encode(gzip.compress(text.encode(), compresslevel=6, mtime=0)).decode()
    if len(packed) > CONFIGMAP_LIMIT:
        raise HistoryTooLarge(f"history of {len(history.trials)} trials is {len(packed)} bytes compressed; "
                              "a ConfigMap holds 1 MiB (lower spec.tuning.maxTrials)")
    return {}, {c.HISTORY_GZ_KEY: packed}


def decode_history(body: dict[str, Any]) -> History | None:
    """The history stored in a ConfigMap body (None when it holds none)."""
    data = body.get("data") or {}
    binary = body.get("binaryData") or {}
    if binary.get(c.HISTORY_GZ_KEY):
        text = gzip.decompress(base64.b64decode(binary[c.HISTORY_GZ_KEY])).decode()
    elif data.get(c.HISTORY_KEY):
        text = data[c.HISTORY_KEY]
    else:
        return None
    return History.from_dict(json.loads(text))


def decode_published(body: dict[str, Any] | None, key: str) -> Any | None:
    """A JSON document the baseline pod published (plain, or `<key>.gz` base64 gzip)."""
    if not body:
        return None
    binary = body.get("binaryData") or {}
    data = body.get("data") or {}
    if binary.get(f"{key}.gz"):
        return json.loads(gzip.decompress(base64.b64decode(binary[f"{key}.gz"])).decode())
    if data.get(key):
        return json.loads(data[key])
    return None


@dataclass
class HistoryStore:
    kube: Kube
    job: JobRef
    plain_limit: int = 256 * 1024
    resource_version: str | None = None

    @property
    def name(self) -> str:
        return c.history_configmap(self.job.name)

    async def load(self) -> History | None:
        body = await self.kube.read_configmap(self.job.namespace, self.name)
        if body is None:
            self.resource_version = None
            return None
        self.resource_version = body["metadata"].get("resourceVersion")
        return decode_history(body)

    async def save(self, history: History) -> None:
        """Create or replace; raises kube.Conflict when someone else wrote it since our read."""
        data, binary = encode_history(history, self.plain_limit)
        body = configmap(self.job, self.name, c.ROLE_HISTORY, data, binary)
        body["metadata"].setdefault("annotations", {})[f"{c.GROUP}/trials"] = str(len(history.trials))
        if self.resource_version is None:
            created = await self.kube.create_configmap(body)
        else:
            body["metadata"]["resourceVersion"] = self.resource_version
            created = await self.kube.replace_configmap(body)
        self.resource_version = created.get("metadata", {}).get("resourceVersion")
