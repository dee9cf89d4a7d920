"""The protocol's encodings that know no message: canonical JSON and its signatures, the runner's
termination message, ConfigMap payloads (plain JSON or gzip, within a ConfigMap's size), and the
series (`Sample`) of the metric table.

`qtune.protocol` holds the typed messages and the metric table that encodes them with these, and
re-exports every public name here, so `from qtune.protocol import X` works for all of them. Like
`qtune.protocol`, this module imports no framework and nothing of qtune (the operator imports it).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ProtocolError(ValueError):
    """A message that does not decode (missing series, bad JSON label, invalid field)."""


# --- canonical encoding and signatures -------------------------------------------------------
def _canonical_value(value: Any) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):
            return repr(value)
        return float(repr(value))
    if isinstance(value, dict):
        return {str(k): _canonical_value(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [_canonical_value(v) for v in value]
    return value


def canonical_bytes(payload: dict[str, Any]) -> bytes:
    """Deterministic JSON of a result (sorted keys, shortest float repr): what a signature covers."""
    return json.dumps(_canonical_value(payload), sort_keys=True, separators=(",", ":")).encode()


def sign(payload: dict[str, Any], secret: str) -> str:
    return hmac.new(secret.encode(), canonical_bytes(payload), hashlib.sha256).hexdigest()


def verify(payload: dict[str, Any], secret: str, signature: str | None) -> bool:
    return bool(signature) and hmac.compare_digest(sign(payload, secret), str(signature))


STORED_DOMAIN = b"qtune-stored-document\0"
"""Prefix of what a stored document's HMAC covers (a unit secret's message, `uid/unit/attempt`, never starts so)."""


def sign_stored(signing_key: str, job_uid: str, key: str, value: str) -> str:
    """HMAC(operator key) over a document the operator stores for a job (e.g. its history): the job's uid, the
    ConfigMap key the value is stored under (plain or `.gz`) and the exact stored string. Checked before the
    value is decoded, so an edited document is refused without being inflated or parsed."""
    message = b"\0".join((STORED_DOMAIN + job_uid.encode(), key.encode(), value.encode()))
    return hmac.new(signing_key.encode(), message, hashlib.sha256).hexdigest()


def verify_stored(signing_key: str, job_uid: str, key: str, value: str, signature: str | None) -> bool:
    return bool(signature) and hmac.compare_digest(sign_stored(signing_key, job_uid, key, value), str(signature))


def value_sha256(value: str) -> str:
    """sha256 (hex) of a stored ConfigMap value exactly as stored (the JSON text, or the base64 of its gzip)."""
    return hashlib.sha256(value.encode()).hexdigest()


def derive_unit_secret(signing_key: str, job_uid: str, unit: str, attempt: int = 0) -> str:
    """The secret of one pod of one unit: HMAC(operator key, job uid / unit id / attempt).

    The operator hands it to that pod only (a Secret it owns, read through secretKeyRef) and can
    derive it again at any time from its key, so it never reads Secrets back."""
    message = f"{job_uid}/{unit}/{int(attempt)}".encode()
    return hmac.new(signing_key.encode(), message, hashlib.sha256).hexdigest()


PUSH_DOMAIN = b"qtune-push\0"
"""Prefix of what a unit's push credential covers (keyed with its unit secret, never with the operator key)."""
GATEWAY_OPERATOR_MESSAGE = b"qtune-results-gateway\0operator"
"""What the operator's results-gateway token is the HMAC of (no unit secret's `uid/unit/attempt` has a NUL)."""


def push_token(unit_secret: str, method: str, body: bytes) -> str:
    """A unit's write credential for ONE request to the results gateway: HMAC(unit secret, method, sha256 of
    the exact body). Replayed it writes only the same bytes again; it reveals nothing of the unit secret."""
    message = PUSH_DOMAIN + method.upper().encode() + b"\0" + hashlib.sha256(body).hexdigest().encode()
    return hmac.new(unit_secret.encode(), message, hashlib.sha256).hexdigest()


def push_authorization(unit_secret: str, attempt: int, method: str, body: bytes) -> str:
    """The `Authorization` header value of a unit's push: `Bearer <attempt>:<push_token>` (the gateway
    derives the unit secret of (job uid, unit from the path, attempt) from the operator key and checks it)."""
    return f"Bearer {int(attempt)}:{push_token(unit_secret, method, body)}"


def gateway_operator_token(signing_key: str) -> str:
    """The operator's bearer token at the results gateway (deletes of any result group, the group listing):
    derived from the operator key, so the gateway and the operator share no other secret."""
    return hmac.new(signing_key.encode(), GATEWAY_OPERATOR_MESSAGE, hashlib.sha256).hexdigest()


# --- the metric table's series ----------------------------------------------------------------
class Sample(BaseModel):
    """One series of the metric table: name, labels (grouping labels excluded), value."""

    model_config = ConfigDict(frozen=True)
    name: str
    labels: dict[str, str] = Field(default_factory=dict)
    value: float


GroupKey = tuple[tuple[str, str], ...]
"""A Pushgateway group's full grouping-label set, sorted (label, value) pairs."""


def group_series(samples: list[tuple[dict[str, str], float]], prefix: str,
                 own_labels: dict[str, frozenset[str]]) -> dict[GroupKey, list[Sample]]:
    """(labels incl. __name__, value) pairs of series named `prefix...` (a Prometheus query, a parsed
    exposition) -> {full grouping-label set: its samples with their own labels only}. A series' grouping
    labels are all its labels but `__name__` and the ones `own_labels[name]` says the series carries itself;
    empty ones count as absent (as Prometheus stores them). Two pushed groups never merge here unless their
    grouping labels are equal."""
    groups: dict[GroupKey, list[Sample]] = {}
    for labels, value in samples:
        name = labels.get("__name__", "")
        if not name.startswith(prefix):
            continue
        own_names = own_labels.get(name, frozenset())
        key = tuple(sorted((k, v) for k, v in labels.items() if v != "" and k != "__name__" and k not in own_names))
        own = {k: v for k, v in labels.items() if k in own_names}
        groups.setdefault(key, []).append(Sample(name=name, labels=own, value=value))
    return groups


# --- the runner's termination message ----------------------------------------------------------
TERMINATION_LIMIT = 4096
"""Kubernetes keeps at most 4096 bytes of a container's termination message."""
INVALID_SPEC = "InvalidSpec"
"""Reason of a termination message whose job spec is unusable (the message names the field)."""
_REASON_RE = r"^\s*([A-Z][A-Za-z0-9]+):\s*(.*)$"


def termination_message(reason: str, message: str) -> str:
    """`Reason: message` (one line first), cut to what Kubernetes keeps."""
    text = f"{reason}: {message}"
    return text.encode()[:TERMINATION_LIMIT].decode(errors="ignore")


def parse_termination(text: str | None) -> tuple[str | None, str]:
    """(reason, message) of a termination message; reason None when it has no `Reason:` prefix."""
    import re

    text = (text or "").strip()
    match = re.match(_REASON_RE, text, re.S)
    if match:
        return match.group(1), match.group(2).strip()
    return None, text


RESULT_TAG = "qtune-result/v1 "
"""Prefix of a termination message that carries a unit's signed result (zlib + base64 JSON after it)."""
RESULT_INFLATED_LIMIT = 256 * 1024
"""A termination message's result may not inflate beyond this."""


def pack_termination(document: Any) -> str | None:
    """`RESULT_TAG` + base64(zlib(JSON of `document`)), or None when that exceeds TERMINATION_LIMIT bytes."""
    import base64
    import zlib

    raw = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
    text = RESULT_TAG + base64.b64encode(zlib.compress(raw, 9)).decode()
    return text if len(text.encode()) <= TERMINATION_LIMIT else None


def unpack_termination(text: str | None) -> Any | None:
    """The document of a `pack_termination` message; None for any other message (a failure's `Reason:
    message`, a log tail); ProtocolError for a tagged one that does not decode within the limits."""
    import base64
    import zlib

    text = (text or "").strip()
    if not text.startswith(RESULT_TAG.strip()):
        return None
    body = text[len(RESULT_TAG.strip()):].strip()
    if len(body) > TERMINATION_LIMIT:
        raise ProtocolError(f"result message of {len(body)} bytes: more than {TERMINATION_LIMIT}")
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(base64.b64decode(body, validate=True), RESULT_INFLATED_LIMIT + 1)
        if len(raw) > RESULT_INFLATED_LIMIT or inflater.unconsumed_tail:
            raise ProtocolError(f"result message inflates beyond {RESULT_INFLATED_LIMIT} bytes")
        return json.loads(raw)
    except (ValueError, zlib.error, RecursionError) as exc:
        raise ProtocolError(f"result message does not decode: {type(exc).__name__}: {exc}") from None


# --- ConfigMap payloads -------------------------------------------------------------------------
CONFIGMAP_LIMIT = 1024 * 1024 - 16 * 1024
"""A ConfigMap holds at most 1 MiB (data + binaryData); keep a margin for metadata."""
PLAIN_LIMIT = 256 * 1024
"""Documents up to this size are stored as plain JSON (readable with kubectl); larger ones gzip."""
INFLATED_LIMIT = 64 * 1024 * 1024
"""A compressed document may not inflate beyond this (a zip bomb is refused, not unpacked)."""
RATIO_LIMIT = 200
"""...nor inflate more than this many times its compressed size."""


class PayloadTooLarge(ValueError):
    """A document does not fit in a ConfigMap, or a stored one inflates beyond the limits."""


def encode_document(key: str, document: Any, plain_limit: int | None = None,
                    limit: int | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(data, binaryData) holding `document` as JSON under `key`, or gzip+base64 under `key.gz`."""
    import base64
    import gzip

    plain_limit = PLAIN_LIMIT if plain_limit is None else plain_limit
    limit = CONFIGMAP_LIMIT if limit is None else limit
    text = json.dumps(document, separators=(",", ":"), sort_keys=True)
    raw = text.encode()
    if len(raw) <= plain_limit:
        return {key: text}, {}
    packed = base64.b64encode(gzip.compress(raw, compresslevel=6, mtime=0)).decode()
    if len(packed) > limit:
        raise PayloadTooLarge(f"{key} is {len(raw)} bytes, {len(packed)} compressed: more than a ConfigMap "
                              f"holds ({limit} bytes)")
    return {}, {f"{key}.gz": packed}


def stored_value(body: dict[str, Any] | None, key: str) -> tuple[str, str] | None:
    """(the key it is under, the value) of the document stored under `key` (plain) or `key.gz` (gzip+base64)
    in a ConfigMap body, exactly as stored; None when absent."""
    binary = (body or {}).get("binaryData") or {}
    if binary.get(f"{key}.gz"):
        return f"{key}.gz", str(binary[f"{key}.gz"])
    data = (body or {}).get("data") or {}
    if data.get(key):
        return key, str(data[key])
    return None


STRUCTURAL = tuple(ord(ch) for ch in "{[,:")
"""JSON's structural bytes: their count bounds from above the number of values (objects, lists, members,
elements) a text decodes to, so it is checked on the text before any object is built."""


def structural_count(text: str | bytes) -> int:
    raw = text.encode() if isinstance(text, str) else text
    return sum(raw.count(byte) for byte in STRUCTURAL)


def _check_elements(key: str, text: str | bytes, element_limit: int | None) -> None:
    if element_limit is not None and (count := structural_count(text)) > element_limit:
        raise PayloadTooLarge(f"{key}: {count} JSON structural characters {{[,: (an upper bound of its elements), "
                              f"more than {element_limit}: refused before parsing")


def decode_document(body: dict[str, Any] | None, key: str, limit: int | None = None,
                    inflated_limit: int | None = None, ratio_limit: int | None = None,
                    element_limit: int | None = None) -> Any | None:
    """The JSON document stored under `key` (plain) or `key.gz` (gzip+base64); None when absent.
    Raises PayloadTooLarge for oversized or over-compressed payloads (and, with `element_limit`, for a text
    holding more structural bytes `{[,:` than that: counted before parsing), ProtocolError for bad ones."""
    import base64
    import zlib

    limit = CONFIGMAP_LIMIT if limit is None else limit
    inflated_limit = INFLATED_LIMIT if inflated_limit is None else inflated_limit
    ratio_limit = RATIO_LIMIT if ratio_limit is None else ratio_limit
    if not body:
        return None
    data = body.get("data") or {}
    binary = body.get("binaryData") or {}
    if binary.get(f"{key}.gz"):
        packed = binary[f"{key}.gz"]
        if len(packed) > limit:
            raise PayloadTooLarge(f"{key}.gz: {len(packed)} bytes, more than {limit}")
        try:
            compressed = base64.b64decode(packed, validate=True)
        except ValueError as exc:
            raise ProtocolError(f"{key}.gz: not base64: {exc}") from None
        cap = min(inflated_limit, max(1, len(compressed)) * ratio_limit)
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            raw = inflater.decompress(compressed, cap + 1)
        except zlib.error as exc:
            raise ProtocolError(f"{key}.gz: not gzip: {exc}") from None
        if len(raw) > cap or inflater.unconsumed_tail:
            raise PayloadTooLarge(f"{key}.gz inflates beyond {cap} bytes ({len(compressed)} compressed): refused")
        del compressed, inflater
        _check_elements(key, raw, element_limit)
        try:
            text = raw.decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"{key}.gz: not UTF-8: {exc}") from None
    elif data.get(key):
        text = data[key]
        if len(text.encode()) > min(limit, inflated_limit):
            raise PayloadTooLarge(f"{key}: {len(text.encode())} bytes, more than {min(limit, inflated_limit)}")
        _check_elements(key, text, element_limit)
    else:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser goes
        raise ProtocolError(f"{key}: not JSON: {type(exc).__name__}: {exc}") from None
