"""What the operator stores or reads from a job's ConfigMaps is believed only when it verifies (issue 20).

* the published tuning space: read only once the baseline's signed result is accepted, decoded only when its
  stored value has the hash that result signs, under a byte and an element cap, at most once per value;
* the history: signed by the operator (its key, the job's uid, the stored value); an edit, an unsigned history
  or a deleted one fails the job HistoryRejected, nothing of it believed;
* unit secrets: the attempt of each start is stored in the history before its Secret exists, so a restarted
  operator never issues the same (unit, attempt) secret again.
"""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any

import pytest
from opfakes import SIGNING_KEY, job_body, tiny_space
from test_reconcile import BASELINE_POD, World, spec_dict

from qtune import protocol
from qtune.operator import constants as c
from qtune.operator import spaces
from qtune.operator import status as st
from qtune.operator.config import SPACE_LIMIT_BYTES, SPACE_LIMIT_ELEMENTS, OperatorConfig
from qtune.operator.spaces import SpaceLoader
from qtune.operator.store import PAYLOAD_TOO_LARGE, PayloadRejected
from qtune.tuning import codec

CONFIG = OperatorConfig(prometheus_url="http://prom:9090", pushgateway_url="http://pgw:9091",
                        trial_image="qtune:test", signing_key=SIGNING_KEY)
MiB = 1024 * 1024


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The published spaces the operator decoded (by ConfigMap)."""
    seen: list[str] = []
    real = spaces.decode_bounded

    def counting(body: dict[str, Any], key: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(body["metadata"]["name"])
        return real(body, key, *args, **kwargs)

    monkeypatch.setattr(spaces, "decode_bounded", counting)
    return seen


def _baseline_result(world: World, space_sha256: str | None) -> protocol.BaselineResult:
    result = world.runner._result(world.unit_of(world.kube.pods[BASELINE_POD])).result
    assert isinstance(result, protocol.BaselineResult)
    return result.model_copy(update={"space_sha256": space_sha256})


def _publish(world: World, packed: str | None = None) -> str:
    """The baseline pod publishes (the simulated space, or `packed` gzip); the stored value's sha256."""
    if packed is None:
        data, binary = protocol.encode_document(c.SPACE_KEY, codec.dump(world.space))
    else:
        data, binary = {}, {f"{c.SPACE_KEY}.gz": packed}
    world.kube.configmaps[c.baseline_configmap("digits")].update(data=data, binaryData=binary)
    stored = protocol.stored_value({"data": data, "binaryData": binary}, c.SPACE_KEY)
    assert stored is not None
    return protocol.value_sha256(stored[1])


def test_the_space_is_decoded_only_after_the_signed_result_and_once(decodes: list[str]) -> None:
    world = World(job_body(spec=spec_dict()), config=CONFIG)
    world.step()
    digest = _publish(world)
    world.kube.finish_pod(BASELINE_POD)  # succeeded; no result yet
    for _ in range(5):  # waiting for the result: nothing is decoded on any step
        assert not world.step().done
    world.push("baseline", _baseline_result(world, digest), "not-the-pods-secret")  # a forgery: not accepted
    for _ in range(3):
        world.step()
    assert decodes == [] and world.history().baseline is None
    world.push("baseline", _baseline_result(world, digest), world.secret_of(world.kube.pods[BASELINE_POD]))
    world.step()
    assert decodes == ["digits-baseline"] and world.history().baseline.space_sha256 == digest
    for _ in range(3):
        world.step()
        world.finish_running()
    assert decodes == ["digits-baseline"], "once, not on every step"
    world.restart()  # a new process decodes it once more, verified against the signed history
    for _ in range(3):
        world.step()
        world.finish_running()
    assert decodes == ["digits-baseline"] * 2
    assert world.run_to_end().state == st.SUCCEEDED_STATE and decodes == ["digits-baseline"] * 2


def test_a_space_edited_after_the_baseline_signed_it_fails_the_job(decodes: list[str]) -> None:
    world = World(job_body(spec=spec_dict()), config=CONFIG)
    world.step()
    digest = _publish(world)
    space = codec.dump(world.space)
    space["ops"] = space["ops"][:1]  # a smaller space, same form
    world.kube.configmaps[c.baseline_configmap("digits")]["data"] = {c.SPACE_KEY: json.dumps(space)}
    world.push("baseline", _baseline_result(world, digest), world.secret_of(world.kube.pods[BASELINE_POD]))
    world.kube.finish_pod(BASELINE_POD)
    result = world.step()
    assert result.done and world.kube.status["reason"] == "SpaceMismatch"
    assert "ConfigMap ml/digits-baseline" in world.kube.status["message"] and digest in world.kube.status["message"]
    assert decodes == []


def _packed(text: bytes) -> str:
    deflater = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return base64.b64encode(deflater.compress(text) + deflater.flush()).decode()


@pytest.mark.parametrize("shape", ["objects", "numbers"])
def test_a_signed_bomb_is_refused_under_the_caps_without_parsing(shape: str) -> None:
    """The baseline pod runs the job's code and may sign what it publishes: 5.5 million empty objects in about
    100 KB of gzip (refused by the byte cap, inflating no further), or 1.9 million numbers under the byte cap
    (refused by the element count, before any object is built)."""
    text = b"[" + b"{}," * 5_500_000 + b"{}]" if shape == "objects" else b"[" + b"0," * 1_900_000 + b"0]"
    packed = _packed(text)
    assert len(packed) < protocol.CONFIGMAP_LIMIT
    del text
    world = World(job_body(spec=spec_dict()), config=CONFIG)
    world.step()
    digest = _publish(world, packed)
    world.push("baseline", _baseline_result(world, digest), world.secret_of(world.kube.pods[BASELINE_POD]))
    world.kube.finish_pod(BASELINE_POD)
    result, peak = world.traced_step()
    assert result.done and world.kube.status["reason"] == PAYLOAD_TOO_LARGE
    message = world.kube.status["message"]
    assert "ConfigMap ml/digits-baseline" in message
    assert str(SPACE_LIMIT_BYTES if shape == "objects" else SPACE_LIMIT_ELEMENTS) in message
    assert peak < 3 * SPACE_LIMIT_BYTES, f"the step took {peak / MiB:.0f} MiB"
    assert not [n for n in world.kube.created_pods if "trial" in n]


def test_the_space_loader_decodes_once_per_value_and_resource_version() -> None:
    data, _ = protocol.encode_document(c.SPACE_KEY, codec.dump(tiny_space()))
    body = {"metadata": {"name": "j-baseline", "namespace": "ml", "resourceVersion": "7"}, "data": data}
    digest = protocol.value_sha256(data[c.SPACE_KEY])
    loader = SpaceLoader(SPACE_LIMIT_BYTES, SPACE_LIMIT_ELEMENTS)
    first = loader.load(body, digest)
    assert loader.load(body, digest) is first and loader.decodes == 1
    body["metadata"]["resourceVersion"] = "8"  # rewritten with the same value: hashed again, not decoded
    assert loader.load(body, digest) is first and loader.decodes == 1
    assert loader.load({"metadata": {}, "data": {}}, digest) is None
    with pytest.raises(PayloadRejected) as caught:
        loader.load(body, None)  # a result naming no hash (an older runner) does not adopt the value
    assert caught.value.reason == "SpaceMismatch"


def test_the_caps_leave_ten_times_the_largest_known_space() -> None:
    """The defaults, against a real space: PP-OCRv4's (282 ops, the largest model the project tunes; the bundled
    examples' are 1-11 KB) is 97,185 bytes of JSON with 11,807 structural characters. One of its shape with ten
    times its ops is at least ten times both, and fits both caps."""
    def op(i: int) -> dict[str, Any]:
        return {"name": f"p2o.Conv.{i}", "op_type": "Conv", "approach": ["static"],
                "activation": {"dtype": ["uint8", "int8", "fp32"], "scheme": ["asym", "sym"],
                               "granularity": ["per_tensor"], "algorithm": ["minmax", "kl", "percentile"],
                               "reduce_range": [False, True]},
                "weight": {"dtype": ["int8", "uint8", "fp32"], "scheme": ["sym", "asym"],
                           "granularity": ["per_channel", "per_tensor"], "algorithm": ["minmax"],
                           "reduce_range": [False, True]}}
    ops = 10 * 282
    space = {"ops": [op(i) for i in range(ops)], "sensitivity": {f"p2o.Conv.{i}": 0.00123 * i for i in range(ops)},
             "time_share": {f"p2o.Conv.{i}": [0.000456, 0.000789] for i in range(ops)}}
    text = json.dumps(space, separators=(",", ":"))
    assert len(text) >= 10 * 97_185 and protocol.structural_count(text) >= 10 * 11_807
    assert len(text) < SPACE_LIMIT_BYTES and protocol.structural_count(text) < SPACE_LIMIT_ELEMENTS


# ---------------------------------------------------------------------------------------- the history
def _edit_history(world: World, edit: Any) -> None:
    body = world.kube.configmaps[c.history_configmap("digits")]
    document = json.loads(body["data"][c.HISTORY_KEY])
    edit(document)
    body["data"][c.HISTORY_KEY] = json.dumps(document, separators=(",", ":"), sort_keys=True)


def _first_trial_done(world: World) -> None:
    world.step()
    world.finish_running()  # the baseline
    world.step()
    world.finish_running()  # trial 0
    world.step()
    assert world.history().trials[0].accuracy is not None


def test_a_forged_history_edit_is_refused_after_a_restart() -> None:
    world = World(job_body(spec=spec_dict(parallelTrials=1)), config=CONFIG)
    _first_trial_done(world)

    def forge(document: dict[str, Any]) -> None:
        document["trials"][0]["accuracy"] = 0.99
    _edit_history(world, forge)
    world.restart()
    result = world.step()
    assert result.done and world.kube.status["state"] == st.FAILED_STATE
    assert world.kube.status["reason"] == "HistoryRejected"
    assert "ConfigMap ml/digits-history" in world.kube.status["message"]


def test_a_forged_history_edit_is_refused_by_the_running_operator() -> None:
    """The operator's next write conflicts (another resourceVersion), it reads the history again: refused."""
    world = World(job_body(spec=spec_dict(parallelTrials=1)), config=CONFIG)
    _first_trial_done(world)
    body = world.kube.configmaps[c.history_configmap("digits")]
    _edit_history(world, lambda document: document["trials"][0].update(accuracy=0.99))
    body["metadata"]["resourceVersion"] = "edited"
    for _ in range(4):
        world.finish_running()
        result = world.step()
        if result.done:
            break
    assert world.kube.status["reason"] == "HistoryRejected", world.kube.status


def test_an_unsigned_or_deleted_history_is_refused() -> None:
    world = World(job_body(spec=spec_dict(parallelTrials=1)), config=CONFIG)
    _first_trial_done(world)
    del world.kube.configmaps[c.history_configmap("digits")]["metadata"]["annotations"][c.HISTORY_SIGNATURE]
    world.restart()
    assert world.step().done and world.kube.status["reason"] == "HistoryRejected"
    assert "not signed" in world.kube.status["message"]

    again = World(job_body(spec=spec_dict(parallelTrials=1)), config=CONFIG)
    _first_trial_done(again)
    del again.kube.configmaps[c.history_configmap("digits")]
    again.restart()
    assert again.step().done and again.kube.status["reason"] == "HistoryRejected"
    assert "is gone" in again.kube.status["message"]


def test_the_history_signature_is_the_operators_key_over_uid_and_value() -> None:
    world = World(job_body(spec=spec_dict()), config=CONFIG)
    world.step()
    body = world.kube.configmaps[c.history_configmap("digits")]
    signature = body["metadata"]["annotations"][c.HISTORY_SIGNATURE]
    value = body["data"][c.HISTORY_KEY]
    uid = world.reconciler.job.uid
    assert protocol.verify_stored(SIGNING_KEY, uid, c.HISTORY_KEY, value, signature)
    assert not protocol.verify_stored(SIGNING_KEY, "another-uid", c.HISTORY_KEY, value, signature)
    assert not protocol.verify_stored("another-key", uid, c.HISTORY_KEY, value, signature)
    assert signature != protocol.derive_unit_secret(SIGNING_KEY, uid, "baseline", 0)


# ---------------------------------------------------------------------------------------- unit secrets
def test_an_attempt_is_never_issued_twice_across_a_restart() -> None:
    """The baseline pod (attempt 0) and its Secret are deleted; a restarted operator sees no pod of the unit,
    and still starts it as attempt 1: the history says attempt 0's secret was issued (someone who mounted it
    could otherwise sign for the new pod)."""
    world = World(job_body(spec=spec_dict()), config=CONFIG)
    world.step()
    assert BASELINE_POD in world.kube.pods and world.history().attempts == {"baseline": 0}
    del world.kube.pods[BASELINE_POD]
    world.kube.objects.pop(("Secret", c.unit_key(BASELINE_POD)))
    world.restart()
    world.step()
    assert BASELINE_POD not in world.kube.pods and "digits-baseline-a1" in world.kube.pods
    assert ("Secret", c.unit_key(BASELINE_POD)) not in world.kube.objects
    assert world.history().attempts == {"baseline": 1}
    world.finish_running()
    assert world.run_to_end().done


def test_an_earlier_signed_history_put_back_is_refused_by_the_running_operator() -> None:
    """A copy of the history the operator itself signed earlier (so it verifies), put back later: the process
    that stored more refuses it (a restarted one cannot tell: documented)."""
    world = World(job_body(spec=spec_dict(parallelTrials=1)), config=CONFIG)
    world.step()
    world.finish_running()  # the baseline
    world.step()
    earlier = json.loads(json.dumps(world.kube.configmaps[c.history_configmap("digits")]))
    world.finish_running()  # trial 0
    world.step()
    world.finish_running()
    world.step()
    assert len(world.history().trials) >= 2
    rv = world.kube.configmaps[c.history_configmap("digits")]["metadata"]["resourceVersion"]
    earlier["metadata"]["resourceVersion"] = rv + "-put-back"
    world.kube.configmaps[c.history_configmap("digits")] = earlier
    for _ in range(4):
        world.finish_running()
        if world.step().done:
            break
    assert world.kube.status["reason"] == "HistoryRejected" and "earlier history" in world.kube.status["message"]
