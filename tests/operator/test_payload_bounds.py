"""What the operator inflates from a ConfigMap is bounded (issue 12): the baseline pod runs the job's
code and writes the tuning space gzip-compressed; a gzip bomb there (or in the history ConfigMap)
fails that one job with a reason naming the ConfigMap and the limit, and never grows the operator."""

from __future__ import annotations

import base64
import gc
import gzip
import json
import tracemalloc
import zlib

import pytest
from opfakes import SIGNING_KEY, job_body
from test_reconcile import BASELINE_POD, World, spec_dict

from qtune import protocol
from qtune.operator import constants as c
from qtune.operator import status as st
from qtune.operator.config import OperatorConfig
from qtune.operator.store import INVALID_PAYLOAD, PAYLOAD_TOO_LARGE, PayloadRejected, decode_history, decode_published

CONFIG = OperatorConfig(prometheus_url="http://prom:9090", pushgateway_url="http://pgw:9091",
                        trial_image="qtune:test", signing_key=SIGNING_KEY)
MiB = 1024 * 1024


def gzip_bomb(inflated: int = 640 * MiB) -> str:
    """base64 of gzip of `inflated` zero bytes, built in 1 MiB steps (about 650 KB compressed: small
    enough for a ConfigMap, so the size check alone does not stop it; the inflater must)."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(MiB)
    parts = [deflater.compress(chunk) for _ in range(inflated // MiB)]
    parts.append(deflater.flush())
    packed = base64.b64encode(b"".join(parts)).decode()
    assert len(packed) < protocol.CONFIGMAP_LIMIT
    return packed


@pytest.fixture(scope="module")
def bomb() -> str:
    return gzip_bomb()


def _configmap(name: str, key: str, packed: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "ml"},
            "binaryData": {f"{key}.gz": packed}}


def test_a_gzip_bomb_is_refused_in_bounded_memory(bomb: str) -> None:
    body = _configmap("digits-baseline", c.SPACE_KEY, bomb)
    gc.collect()
    tracemalloc.start()
    try:
        with pytest.raises(PayloadRejected) as caught:
            decode_published(body, c.SPACE_KEY)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100 * MiB, f"decoding took {peak / MiB:.0f} MiB"
    assert caught.value.reason == PAYLOAD_TOO_LARGE
    assert "ConfigMap ml/digits-baseline" in caught.value.message
    assert str(c.DECODED_PAYLOAD_LIMIT) in caught.value.message


def test_a_document_under_the_limit_decodes_and_garbage_is_rejected() -> None:
    space = {"ops": {f"op{i}": {"type": "Conv"} for i in range(1000)}}
    data, binary = protocol.encode_document(c.SPACE_KEY, space, plain_limit=0)
    assert binary and decode_published({"data": data, "binaryData": binary}, c.SPACE_KEY) == space
    # just over a (lowered) limit: refused, not truncated
    raw = gzip.decompress(base64.b64decode(binary[f"{c.SPACE_KEY}.gz"]))
    assert json.loads(raw) == space
    with pytest.raises(PayloadRejected, match=f"at most {len(raw) - 1} bytes"):
        decode_published({"data": data, "binaryData": binary}, c.SPACE_KEY, limit=len(raw) - 1)
    deep = {"metadata": {"name": "digits-baseline", "namespace": "ml"}, "data": {c.SPACE_KEY: "[" * 200_000}}
    with pytest.raises(PayloadRejected) as caught:  # nesting deeper than the JSON parser goes
        decode_published(deep, c.SPACE_KEY)
    assert caught.value.reason == INVALID_PAYLOAD and "ConfigMap ml/digits-baseline" in caught.value.message
    not_gzip = base64.b64encode(b"\xff" * 100).decode()
    with pytest.raises(PayloadRejected, match="not gzip"):
        decode_history(_configmap("digits-history", c.HISTORY_KEY, not_gzip))


def test_a_bomb_put_in_place_of_the_published_space_is_refused_undecoded(bomb: str) -> None:
    """Written after the baseline signed its space's hash (by the job's code, or anyone editing ConfigMaps):
    the value's hash is not the signed one, so it is never inflated (issue 20: SpaceMismatch)."""
    world = World(job_body(spec=spec_dict()), config=CONFIG)
    world.step()
    world.finish(BASELINE_POD)
    world.kube.configmaps[c.baseline_configmap("digits")]["binaryData"] = {f"{c.SPACE_KEY}.gz": bomb}
    world.kube.configmaps[c.baseline_configmap("digits")]["data"] = {}
    result = world.step()
    assert result.done and world.kube.status["state"] == st.FAILED_STATE
    assert world.kube.status["reason"] == "SpaceMismatch"
    assert "ConfigMap ml/digits-baseline" in world.kube.status["message"]
    assert world.reconciler.executor.spaces.decodes == 0
    assert not [n for n in world.kube.created_pods if "trial" in n]


def test_a_bomb_in_the_history_fails_the_job_uninflated(bomb: str) -> None:
    """The history's signature is checked on the stored value, before anything is inflated (issue 20)."""
    world = World(job_body(spec=spec_dict()), config=CONFIG)
    world.step()
    history = world.kube.configmaps[c.history_configmap("digits")]
    history["data"] = {}
    history["binaryData"] = {c.HISTORY_GZ_KEY: bomb}
    world.restart()  # a new operator process reads the history again
    result, peak = world.traced_step()
    assert result.done and world.kube.status["reason"] == "HistoryRejected"
    assert "ConfigMap ml/digits-history" in world.kube.status["message"]
    assert peak < 16 * MiB, f"the step took {peak / MiB:.0f} MiB"
