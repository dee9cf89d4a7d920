"""The job history in a ConfigMap `<job>-history` owned by the job (deleted with it).

The history is the record of truth: a trial is added (pending) BEFORE its pod is created and its
result is recorded BEFORE its pod and Pushgateway group are deleted, so after an operator
restart no trial index is used twice and no finished trial runs again.

Identity is the job's uid, never its name: a ConfigMap of the history's name is read (and written)
only when its ownerReference carries this job's uid. One owned by an earlier job of the same name
(deleted and recreated) is `ForeignObject(previous=True)`: left to the garbage collector, never
adopted; any other one is `ForeignObject(previous=False)`: never changed, never deleted.

Small histories are stored as plain JSON (`data["history.json"]`, readable with kubectl);
larger ones gzip-compressed in `binaryData["history.json.gz"]` (base64 in the API). Updates carry
the resourceVersion they were based on, so a concurrent writer is detected (Conflict), never
silently overwritten.

Decoding is bounded (constants.DECODED_PAYLOAD_LIMIT, streaming inflate): the baseline pod runs the
job's code and publishes the tuning space through a ConfigMap, so whatever a ConfigMap holds is
untrusted; a document inflating beyond the limit, or not gzip/JSON, is PayloadRejected and fails
that one job (PayloadTooLarge / InvalidPayload, naming the ConfigMap and the limit).

Trust boundary (issue 20): anyone who may edit ConfigMaps in the job's namespace can edit these two.
* The history is signed: an HMAC of the operator's signing key over the job's uid, the key and the exact
  stored value (`protocol.sign_stored`), in the annotation `qtune.io/history-signature`, written in the
  same replace as the data (one object, one resourceVersion: the operator's own writes never race it).
  It is checked BEFORE anything is inflated or parsed; a history that does not verify (edited, or
  unsigned: written by an operator before issue 20, which is refused, not adopted) fails the job
  HistoryRejected and nothing of it is believed.
* An earlier history the operator itself signed for the job, put back (it verifies), is refused too: each store
  raises the signed `History.sequence`, and the operator records it in the job's status (`status.history.sequence`,
  written through the status subresource, which tenants are not granted). A history older than the status's, or
  than this process stored (`HistoryStore.saved`), fails the job HistoryRejected, also after a restart or on a
  peer. Jobs whose status records no sequence yet (started before it existed) are accepted and recorded from their
  next store. Left open: the one store between a history write and the status write that follows it in the same
  step (an operator stopped right there may, once restarted, accept the history of the step before).
* The tuning space is bound to the baseline's signed result (`BaselineResult.space_sha256`, kept in the
  history's baseline): `SpaceLoader` decodes it only for an accepted result, only when the stored value
  has that hash (SpaceMismatch otherwise), under a byte and an element cap (PayloadTooLarge), at most
  once per value.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qtune import protocol
from qtune.operator import constants as c
from qtune.operator.builders import configmap
from qtune.operator.kube import Kube
from qtune.operator.layout import JobRef
from qtune.tuning import codec
from qtune.tuning.history import History

logger = logging.getLogger(__name__)


OWNED, PREVIOUS, FOREIGN = "owned", "previous", "foreign"


def ownership(body: dict[str, Any], job: JobRef) -> str:
    """OWNED when an ownerReference carries the job's uid; PREVIOUS when one names an earlier
    QuantizationJob of the same name (another uid: garbage collection will delete the object);
    FOREIGN otherwise (someone else's object that only shares the name)."""
    refs = (body.get("metadata") or {}).get("ownerReferences") or []
    if any(ref.get("uid") == job.uid for ref in refs):
        return OWNED
    if any(ref.get("kind") == c.KIND and ref.get("name") == job.name and str(ref.get("apiVersion", "")).startswith(
            c.GROUP + "/") for ref in refs):
        return PREVIOUS
    return FOREIGN


class ForeignObject(Exception):
    """An object of a name the operator uses for this job exists and is not this job's."""

    def __init__(self, kind: str, namespace: str, name: str, previous: bool, owner_uids: tuple[str, ...] = ()) -> None:
        self.kind, self.namespace, self.name, self.previous = kind, namespace, name, previous
        if previous:
            text = (f"{kind} {namespace}/{name} belongs to an earlier job of this name (uid "
                    f"{', '.join(owner_uids) or '?'}); waiting for the garbage collector to delete it")
        else:
            text = (f"{kind} {namespace}/{name} exists and is not owned by this job: the operator neither "
                    "uses, changes nor deletes it; rename or delete that object (or rename the job)")
        super().__init__(text)
        self.message = text

    @classmethod
    def of(cls, body: dict[str, Any], job: JobRef) -> ForeignObject:
        meta = body.get("metadata") or {}
        owners = tuple(str(ref.get("uid", "")) for ref in meta.get("ownerReferences") or [])
        return cls(str(body.get("kind") or "ConfigMap"), job.namespace, str(meta.get("name", "")),
                   ownership(body, job) == PREVIOUS, owners)


def check_owned(body: dict[str, Any], job: JobRef) -> None:
    """Raise ForeignObject unless the job owns `body`."""
    if ownership(body, job) != OWNED:
        raise ForeignObject.of(body, job)


class HistoryTooLarge(protocol.PayloadTooLarge):
    """Even compressed, the history does not fit in a ConfigMap."""


def encode_history(history: History, plain_limit: int | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(data, binaryData) of the history ConfigMap."""
    try:
        return protocol.encode_document(c.HISTORY_KEY, codec.dump(history), plain_limit)
    except protocol.PayloadTooLarge as exc:
        raise HistoryTooLarge(f"the history of {len(history.trials)} trials does not fit in a ConfigMap ({exc}); "
                              "lower spec.tuning.maxTrials") from None


PAYLOAD_TOO_LARGE = "PayloadTooLarge"
INVALID_PAYLOAD = "InvalidPayload"


class PayloadRejected(Exception):
    """A ConfigMap of the job holds a document the operator refuses to decode (it inflates beyond
    the limit, or is not gzip/JSON): the job fails with `reason`, the message naming the ConfigMap."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def where(body: dict[str, Any] | None) -> str:
    meta = (body or {}).get("metadata") or {}
    return f"ConfigMap {meta.get('namespace', '?')}/{meta.get('name', '?')}"


def decode_bounded(body: dict[str, Any] | None, key: str, limit: int = c.DECODED_PAYLOAD_LIMIT,
                   elements: int | None = None) -> Any | None:
    """`protocol.decode_document` with the operator's bound: at most `limit` bytes are ever inflated
    (streaming, whatever the compressed data claims), at most `elements` JSON structural characters
    (counted before parsing); PayloadRejected otherwise."""
    try:
        return protocol.decode_document(body, key, inflated_limit=limit, element_limit=elements)
    except (protocol.PayloadTooLarge, protocol.ProtocolError) as exc:
        if isinstance(exc, protocol.PayloadTooLarge):
            cap = f"{limit} bytes of JSON" + (f" holding at most {elements} elements" if elements else "")
            raise PayloadRejected(PAYLOAD_TOO_LARGE, (
                f"{where(body)}: {exc}; the operator decodes at most {cap} (and "
                f"{protocol.RATIO_LIMIT}x the compressed size) from a job's ConfigMap")) from None
        raise PayloadRejected(INVALID_PAYLOAD, f"{where(body)}: {exc}") from None


HISTORY_REJECTED = "HistoryRejected"


def check_history_signature(body: dict[str, Any], job: JobRef, signing_key: str) -> None:
    """PayloadRejected(HistoryRejected) unless the history ConfigMap's signature annotation verifies over the
    job's uid and its stored value; checked before anything is decoded."""
    stored = protocol.stored_value(body, c.HISTORY_KEY)
    signature = ((body.get("metadata") or {}).get("annotations") or {}).get(c.HISTORY_SIGNATURE)
    if stored is not None and protocol.verify_stored(signing_key, job.uid, *stored, signature):
        return
    if stored is None:
        why = "holds no history"
    elif not signature:
        why = (f"is not signed (no annotation {c.HISTORY_SIGNATURE}: written by someone else, or by an operator "
               "older than issue 20, whose histories are not adopted)")
    else:
        why = "does not match its signature: it was changed by someone other than the operator"
    raise PayloadRejected(HISTORY_REJECTED, (
        f"{where(body)} {why}; nothing of it is believed. Delete and recreate the job to tune again"))


def sign_history(body: dict[str, Any], job: JobRef, signing_key: str) -> None:
    """Put the history's signature in `body`'s annotations (`check_history_signature` verifies it)."""
    stored = protocol.stored_value(body, c.HISTORY_KEY)
    assert stored is not None
    body["metadata"].setdefault("annotations", {})[c.HISTORY_SIGNATURE] = protocol.sign_stored(
        signing_key, job.uid, *stored)


def decode_history(body: dict[str, Any], limit: int = c.DECODED_PAYLOAD_LIMIT) -> History | None:
    """The history stored in a ConfigMap body (None when it holds none); PayloadRejected beyond `limit`.
    Its signature is not checked here (`HistoryStore.load` does, first)."""
    document = decode_bounded(body, c.HISTORY_KEY, limit)
    return None if document is None else codec.load(History, document)


def decode_published(body: dict[str, Any] | None, key: str, limit: int = c.DECODED_PAYLOAD_LIMIT) -> Any | None:
    """A JSON document the baseline pod published (plain, or `<key>.gz` base64 gzip); the pod runs the
    job's code, so the document is untrusted: PayloadRejected beyond `limit` bytes inflated."""
    return decode_bounded(body, key, limit)


def recorded_sequence(status: Any) -> int:
    """The history sequence a job's status records (`status.history.sequence`; 0 when none: a job started before
    it existed, or not stored yet). Only the operator writes a job's status."""
    ref = status.get("history") if isinstance(status, Mapping) else None
    value = ref.get("sequence") if isinstance(ref, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def check_sequence(body: dict[str, Any], history: History, floor: int, source: str) -> None:
    """PayloadRejected(HistoryRejected) when the signed history is older than `floor` (the sequence `source`
    records): an earlier history the operator signed, put back by someone else."""
    if history.sequence >= floor:
        return
    raise PayloadRejected(HISTORY_REJECTED, (
        f"{where(body)} holds an earlier history of this job, older than {source}: its sequence is "
        f"{history.sequence} ({len(history.trials)} trials), {floor} was stored. A version the operator signed "
        "earlier was put back by someone other than the operator; nothing of it is believed. Delete and recreate "
        "the job to tune again"))


@dataclass
class HistoryStore:
    kube: Kube
    job: JobRef
    plain_limit: int | None = None
    signing_key: str = ""
    """The operator's key: the history is signed with it (`sign_history`) and refused unless it verifies."""
    resource_version: str | None = None
    saved: int = 0
    """`History.sequence` of the latest history this process stored: a history read back with less is refused."""

    @property
    def name(self) -> str:
        return c.history_configmap(self.job.name)

    async def load(self, recorded: int = 0) -> History | None:
        """The job's stored history (None when there is none); ForeignObject when a ConfigMap of that
        name exists that this job does not own (it is never read, adopted or overwritten); HistoryRejected when
        it does not verify or is older than `recorded` (the sequence the job's status records) or than this
        process stored."""
        body = await self.kube.read_configmap(self.job.namespace, self.name)
        if body is None:
            self.resource_version = None
            return None
        self.resource_version = None
        check_owned(body, self.job)
        self.resource_version = body["metadata"].get("resourceVersion")
        check_history_signature(body, self.job, self.signing_key)
        history = decode_history(body)
        if history is not None:
            check_sequence(body, history, recorded, "the job's status (status.history.sequence)")
            check_sequence(body, history, self.saved, "the one this operator stored")
        return history

    async def save(self, history: History) -> None:
        """Create or replace, one sequence later; raises kube.Conflict when someone else wrote it since our read
        (the history's sequence is then as it was)."""
        history.sequence += 1
        try:
            await self._store(history)
        except BaseException:
            history.sequence -= 1
            raise
        self.saved = history.sequence

    async def _store(self, history: History) -> None:
        data, binary = encode_history(history, self.plain_limit)
        body = configmap(self.job, self.name, c.ROLE_HISTORY, data, binary)
        body["metadata"].setdefault("annotations", {})[f"{c.GROUP}/trials"] = str(len(history.trials))
        sign_history(body, self.job, self.signing_key)
        if self.resource_version is None:
            created = await self.kube.create_configmap(body)
        else:
            body["metadata"]["resourceVersion"] = self.resource_version
            created = await self.kube.replace_configmap(body)
        self.resource_version = created.get("metadata", {}).get("resourceVersion")
