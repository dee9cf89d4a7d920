"""Kubernetes memory quantities (4Gi, 512Mi, 2G, 1500000) as bytes."""

from __future__ import annotations

import re

MEMORY_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_FACTORS = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def memory_bytes(quantity: str) -> int:
    """Bytes of a memory quantity; ValueError for anything else."""
    match = MEMORY_QUANTITY.match(str(quantity).strip())
    if not match:
        raise ValueError(f"{quantity!r} is not a Kubernetes memory quantity such as 4Gi or 512Mi")
    return int(float(match.group(1)) * _FACTORS[match.group(2)])
