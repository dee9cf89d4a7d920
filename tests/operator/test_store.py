"""History ConfigMap encoding, and the runner's publish patch."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
from pathlib import Path

import pytest
from opfakes import FakeKube, tiny_baseline, tiny_space

from qtune import protocol
from qtune.operator import constants as c
from qtune.operator.kube import Conflict
from qtune.operator.layout import JobRef
from qtune.operator.store import HistoryStore, HistoryTooLarge, decode_history, decode_published, encode_history
from qtune.runner import publish
from qtune.tuning import codec
from qtune.tuning.history import History


def _history(trials: int) -> History:
    history = History(job="digits", baseline=tiny_baseline())
    base = tiny_space().default_config()
    for i in range(trials):
        record = history.add(base.with_ops({}) if i == 0 else base.with_fallback(["fc"]).with_ops({}))
        record.config_key = f"k{i}"
        record.accuracy = 0.9
    return history


def test_small_history_is_plain_json() -> None:
    history = _history(3)
    data, binary = encode_history(history)
    assert set(data) == {c.HISTORY_KEY} and not binary
    assert codec.dump(decode_history({"data": data})) == codec.dump(history)


def test_large_history_is_gzipped() -> None:
    history = _history(400)
    data, binary = encode_history(history, plain_limit=10_000)
    assert not data and set(binary) == {c.HISTORY_GZ_KEY}
    assert json.loads(gzip.decompress(base64.b64decode(binary[c.HISTORY_GZ_KEY])))["job"] == "digits"
    assert codec.dump(decode_history({"binaryData": binary})) == codec.dump(history)


def test_too_large_history(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qtune.wire.CONFIGMAP_LIMIT", 100)
    with pytest.raises(HistoryTooLarge, match="maxTrials"):
        encode_history(_history(50), plain_limit=10)


def test_a_zip_bomb_is_refused_not_inflated() -> None:
    from qtune import protocol
    from qtune.operator.store import INVALID_PAYLOAD, PAYLOAD_TOO_LARGE, PayloadRejected

    bomb = base64.b64encode(gzip.compress(b"[" + b"0," * 5_000_000 + b"0]")).decode()
    with pytest.raises(PayloadRejected, match="inflates") as caught:
        decode_history({"binaryData": {c.HISTORY_GZ_KEY: bomb}})
    assert caught.value.reason == PAYLOAD_TOO_LARGE
    with pytest.raises(PayloadRejected) as caught:
        decode_history({"binaryData": {c.HISTORY_GZ_KEY: "A" * (protocol.CONFIGMAP_LIMIT + 4)}})
    assert caught.value.reason == PAYLOAD_TOO_LARGE
    with pytest.raises(PayloadRejected) as caught:
        decode_history({"binaryData": {c.HISTORY_GZ_KEY: base64.b64encode(b"not gzip").decode()}})
    assert caught.value.reason == INVALID_PAYLOAD


def test_store_detects_concurrent_writers() -> None:
    kube = FakeKube()
    job = JobRef("digits", "ml", "uid")

    async def scenario() -> None:
        first, second = HistoryStore(kube, job), HistoryStore(kube, job)  # type: ignore[arg-type]
        assert await first.load() is None
        await first.save(_history(1))
        assert len((await second.load()).trials) == 1
        await second.save(_history(2))
        with pytest.raises(Conflict):
            await first.save(_history(3))  # based on an old resourceVersion
        assert len((await first.load()).trials) == 2

    asyncio.run(scenario())
    cm = kube.configmaps["digits-history"]
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "uid"
    assert cm["metadata"]["annotations"]["qtune.io/trials"] == "2"


def test_publish_patch_round_trips_through_the_operator_reader(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "space.json").write_text(json.dumps(codec.dump(tiny_space())))
    (tmp_path / "baseline.json").write_text(json.dumps({"accuracy": 0.9}))
    patch = publish.configmap_patch(tmp_path)
    assert patch["binaryData"] == {"space.json.gz": None, "baseline.json.gz": None}
    assert decode_published(patch, c.SPACE_KEY) == codec.dump(tiny_space())

    monkeypatch.setattr("qtune.wire.PLAIN_LIMIT", 10)
    patch = publish.configmap_patch(tmp_path)
    assert patch["data"] == {"space.json": None, "baseline.json": None}
    assert decode_published(patch, "baseline.json") == {"accuracy": 0.9}


def test_publish_needs_the_files(tmp_path: Path) -> None:
    from qtune.spec.errors import QtuneError

    with pytest.raises(QtuneError, match="space.json"):
        publish.configmap_patch(tmp_path)


def test_the_published_space_hash_is_what_the_operator_checks(tmp_path: Path, monkeypatch) -> None:
    """The runner returns the sha256 of space.json exactly as it patched it into the ConfigMap (plain or
    gzip), and the baseline's result carries it (signed with the rest): the operator's loader accepts that
    value under that hash (issue 20)."""
    from qtune.operator.config import SPACE_LIMIT_BYTES, SPACE_LIMIT_ELEMENTS
    from qtune.operator.spaces import SpaceLoader
    from qtune.runner import __main__ as runner
    from qtune.runner import baseline as runner_baseline
    from qtune.tuning.history import Baseline

    (tmp_path / "space.json").write_text(json.dumps(codec.dump(tiny_space())))
    (tmp_path / "baseline.json").write_text(json.dumps({"accuracy": 0.9}))
    patches: list[dict] = []

    class Api:
        def patch_namespaced_config_map(self, name: str, namespace: str, patch: dict) -> None:
            patches.append(patch)

    monkeypatch.setattr(publish, "_api", lambda: Api())
    for plain_limit in (10**6, 10):
        monkeypatch.setattr("qtune.wire.PLAIN_LIMIT", plain_limit)
        digest = publish.publish_baseline("digits-baseline", tmp_path, namespace="ml")
        patch = patches[-1]
        body = {"metadata": {"name": "digits-baseline", "namespace": "ml", "resourceVersion": str(plain_limit)},
                "data": {k: v for k, v in patch["data"].items() if v},
                "binaryData": {k: v for k, v in patch["binaryData"].items() if v}}
        loader = SpaceLoader(SPACE_LIMIT_BYTES, SPACE_LIMIT_ELEMENTS)
        assert codec.dump(loader.load(body, digest)) == codec.dump(tiny_space())

    class Context:
        workspace = tmp_path

    monkeypatch.setattr(runner, "_context", lambda args: Context())
    monkeypatch.setattr(runner_baseline, "run_baseline", lambda context: (tiny_space(), Baseline(accuracy=0.9)))
    monkeypatch.setattr(publish, "publish_baseline", lambda name, workspace: f"sha-of-{name}")
    args = runner._parser().parse_args(["baseline", "--job-json", "{}", "--workspace", str(tmp_path),
                                        "--publish-configmap", "digits-baseline"])
    result = runner._run(args)
    assert isinstance(result, protocol.BaselineResult) and result.space_sha256 == "sha-of-digits-baseline"
    assert "sha-of-digits-baseline" in protocol.signed_payload("uid", "baseline", result)["result"].values()
