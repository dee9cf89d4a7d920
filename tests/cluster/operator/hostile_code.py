"""A hostile tenant's own code (copied into its workspace, named as the job's metric): it runs inside the
baseline pod, with everything the runner has there, and publishes to the operator what the operator
must refuse. The metric itself is honest top-1 (the baseline must get as far as publishing).

* `Bomb`: the tuning space ConfigMap value becomes a decode bomb: ~16 KB of gzip that inflates to
  about 16 MB of JSON, 5.5 million empty objects.
* `BigSpace`: a well-formed tuning space of 40,000 ops (the real one's ops, repeated under new names).

Both go through the runner's own publishing, so the baseline result signs the hash of what was
published: the operator can only refuse them by its size and element caps."""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path
from typing import Any

from qtune import protocol
from qtune.data.metrics import TopK
from qtune.runner import publish

BOMB_OBJECTS = 5_500_000
BIG_SPACE_OPS = 40_000
SPACE = "space.json"


def _bomb_patch(workspace: Path, files: tuple[str, ...] = publish.FILES) -> dict[str, Any]:
    patch = ORIGINAL(workspace, files)
    raw = b"[" + b"{}," * (BOMB_OBJECTS - 1) + b"{}]"
    patch["data"][SPACE] = None
    patch["binaryData"][f"{SPACE}.gz"] = base64.b64encode(gzip.compress(raw, 9)).decode()
    return patch


def _big_space_patch(workspace: Path, files: tuple[str, ...] = publish.FILES) -> dict[str, Any]:
    patch = ORIGINAL(workspace, files)
    space = json.loads((Path(workspace) / SPACE).read_text())
    ops = space["ops"]  # a list of op entries, each with its name
    space["ops"] = [{**ops[i % len(ops)], "name": f"{ops[i % len(ops)]['name']}/copy{i}"}
                    for i in range(BIG_SPACE_OPS)]
    plain, packed = protocol.encode_document(SPACE, space, plain_limit=0)
    patch["data"][SPACE], patch["binaryData"][f"{SPACE}.gz"] = plain.get(SPACE), packed.get(f"{SPACE}.gz")
    return patch


ORIGINAL = publish.configmap_patch


class Bomb(TopK):
    def __init__(self) -> None:
        super().__init__(1)
        publish.configmap_patch = _bomb_patch


class BigSpace(TopK):
    def __init__(self) -> None:
        super().__init__(1)
        publish.configmap_patch = _big_space_patch
