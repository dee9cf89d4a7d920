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

import logging
from dataclasses import dataclass
from typing import Any

from qtune import protocol
from qtune.operator import constants as c
from qtune.operator.builders import configmap
from qtune.operator.kube import Kube
from qtune.operator.layout import JobRef
from qtune.tuning.history import History

logger = logging.getLogger(__name__)


class HistoryTooLarge(protocol.PayloadTooLarge):
    """Even compressed, the history does not fit in a ConfigMap."""


def encode_history(history: History, plain_limit: int | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(data, binaryData) of the history ConfigMap."""
    try:
        return protocol.encode_document(c.HISTORY_KEY, history.to_dict(), plain_limit)
    except protocol.PayloadTooLarge as exc:
        raise HistoryTooLarge(f"the history of {len(history.trials)} trials does not fit in a ConfigMap ({exc}); "
                              "lower spec.tuning.maxTrials") from None


def decode_history(body: dict[str, Any]) -> History | None:
    """The history stored in a ConfigMap body (None when it holds none)."""
    document = protocol.decode_document(body, c.HISTORY_KEY)
    return None if document is None else History.from_dict(document)


def decode_published(body: dict[str, Any] | None, key: str) -> Any | None:
    """A JSON document the baseline pod published (plain, or `<key>.gz` base64 gzip)."""
    return protocol.decode_document(body, key)


@dataclass
class HistoryStore:
    kube: Kube
    job: JobRef
    plain_limit: int | None = None
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
