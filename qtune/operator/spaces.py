"""The tuning space a job's baseline pod published in its `<job>-baseline` ConfigMap, decoded safely.

The baseline pod runs the job's code and may write anything into that ConfigMap (as may anyone who can
edit ConfigMaps in the namespace), so its value is believed only when it is the value the baseline's
signed result names: `BaselineResult.space_sha256` (kept in the history's baseline once recorded) is the
sha256 of the exact stored string (the JSON text, or the base64 of its gzip). The operator

* reads the ConfigMap only once the baseline's result is accepted (its signature verified) or recorded;
* hashes the stored string (no inflating, no parsing) and refuses a value of another hash: the job fails
  SpaceMismatch, naming the ConfigMap;
* decodes a value of the right hash under the operator's caps (`space_limit_bytes` inflated,
  `space_limit_elements` JSON structural characters counted before parsing): the job fails PayloadTooLarge
  beyond them, naming the ConfigMap and the limit;
* decodes each value at most once (`SpaceLoader` keeps the last hash and its TuningSpace, and skips even the
  hashing while the ConfigMap's resourceVersion is the one it checked).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from qtune import protocol
from qtune.operator import constants as c
from qtune.operator.store import INVALID_PAYLOAD, PayloadRejected, decode_bounded, where
from qtune.tuning import codec
from qtune.tuning.space import TuningSpace

logger = logging.getLogger(__name__)

SPACE_MISMATCH = "SpaceMismatch"


@dataclass
class SpaceLoader:
    """One job's published space: decoded only when its hash is the signed one, once per value."""

    byte_limit: int
    element_limit: int
    version: str | None = None
    """resourceVersion of the ConfigMap whose value was last checked (and decoded)."""
    digest: str | None = None
    """sha256 of the value last decoded."""
    space: TuningSpace | None = None
    decodes: int = 0
    """How many values were decoded (tests count them)."""

    def load(self, body: dict[str, Any] | None, expected: str | None) -> TuningSpace | None:
        """The space `body` holds when its stored value's sha256 is `expected` (the signed one); None when the
        ConfigMap holds no space yet; PayloadRejected (SpaceMismatch, PayloadTooLarge, InvalidPayload)
        otherwise."""
        stored = protocol.stored_value(body, c.SPACE_KEY)
        if body is None or stored is None:
            return None
        version = (body.get("metadata") or {}).get("resourceVersion")
        if self.space is not None and version is not None and version == self.version and expected == self.digest:
            return self.space
        digest = protocol.value_sha256(stored[1])
        if expected is None or digest != expected:
            raise PayloadRejected(SPACE_MISMATCH, (
                f"{where(body)}: {stored[0]} has sha256 {digest}, not the "
                + (f"{expected} the baseline's signed result names" if expected else
                   "hash the baseline's signed result should name (it names none: a runner older than the operator)")
                + ": the published tuning space was changed after the baseline pod published it, or by someone "
                  "else; it is not used"))
        if digest != self.digest or self.space is None:
            self.space = self._decode(body)
            self.digest = digest
        self.version = version
        return self.space

    def _decode(self, body: dict[str, Any]) -> TuningSpace:
        self.decodes += 1
        document = decode_bounded(body, c.SPACE_KEY, self.byte_limit, self.element_limit)
        try:
            return codec.load(TuningSpace, document)
        except ValueError as exc:
            raise PayloadRejected(INVALID_PAYLOAD, f"{where(body)}: {c.SPACE_KEY} is no tuning space: "
                                                  f"{str(exc)[:500]}") from None
