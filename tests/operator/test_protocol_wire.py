"""The result protocol on the wire: a real encode -> Pushgateway text format -> decode round trip
(prometheus_client's generate_latest and its parser), signatures, and proof of origin."""

from __future__ import annotations

import math
import typing

import pytest
from opfakes import UID
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from qtune import protocol
from qtune.operator import constants as c
from qtune.operator.layout import JobRef
from qtune.operator.podstatus import PodSummary
from qtune.operator.prom import results_by_job
from qtune.operator.results import ACCEPT, BAD_SIGNATURE, NO_POD, STALE, WAIT, WRONG_UNIT, Observed, judge, unit_pods
from qtune.runner.metrics import result_registry

KEY = "operator-signing-key"
JOB = JobRef("digits", "ml", UID)


def _speed(batch: int, p50: float, fp32: float) -> protocol.SpeedMeasurement:
    return protocol.SpeedMeasurement(batch_size=batch, p50_ms=p50, p90_ms=p50 * 1.3, fp32_p50_ms=fp32,
                                     fp32_p90_ms=fp32 * 1.2, speedup=fp32 / p50, low=fp32 / p50 * 0.93,
                                     high=fp32 / p50 * 1.07, confidence=0.95, rounds=11, runs_per_window=7,
                                     threads=2, seconds=3.0000000000000004)


TRIAL = protocol.TrialResult(
    trial=3, status="succeeded", config_key="0123456789abcdef", accuracy=0.9633333333333334,
    speed={"1": _speed(1, 0.123456789012345, 0.2), "32": _speed(32, 1.7, 4.1)}, model_size_bytes=123_457,
    timings={"quantize": 1.5, "evaluate": 1e-7, "total": 4.25}, model_path="/workspace/.qtune/x/trials/3/model",
    message='warning: "odd" op\\ kept\nsecond line', notes=["kept 2 ops fp32", "ünïcode"],
    peak_rss_bytes={"calibration": 2_147_483_648, "total": 3_221_225_473})
BASELINE = protocol.BaselineResult(accuracy=0.97, metric="top1", latency_ms={"1": 0.31, "32": 5.5},
                                   latency_p90_ms={"1": 0.4, "32": 6.25}, model_size_bytes=400_000, seconds=12.5,
                                   peak_rss_bytes={"calibration": 987_654_321, "total": 1_234_567_890},
                                   space_sha256="9f" * 32)
CONFIRM = protocol.ConfirmResult(candidates=[3, 5], seconds=30.25,
                                 speed={"3": {"32": _speed(32, 1.8, 4.0)}, "5": {"32": _speed(32, 1.9, 4.0)}})
FAILED = protocol.TrialResult(trial=4, status="failed", reason="TrialError", message="ValueError: bad scale",
                              accuracy=float("nan"))


def _wire(result: protocol.Result, unit: str, secret: str | None = None) -> tuple[protocol.Result, str | None]:
    """Encode, render as the Pushgateway text format, parse it back, decode."""
    signature = protocol.sign_result(UID, unit, result, secret) if secret else None
    text = generate_latest(result_registry(result, signature)).decode()
    pairs = [({"__name__": s.name, **s.labels, "job": protocol.PUSH_JOB, "job_uid": UID, "unit": unit,
               "instance": ""}, s.value)
             for family in text_string_to_metric_families(text) for s in family.samples]
    groups = protocol.group_samples(pairs)
    assert set(groups) == {(UID, unit)}
    return protocol.decode_result(groups[(UID, unit)])


@pytest.mark.parametrize("result,unit", [(TRIAL, "trial-3"), (BASELINE, "baseline"), (CONFIRM, "confirm")])
def test_round_trip_is_lossless_and_the_signature_survives(result: protocol.Result, unit: str) -> None:
    decoded, signature = _wire(result, unit, secret="s3cret")
    assert decoded == result
    assert decoded.model_dump() == result.model_dump()
    assert protocol.verify_result(UID, unit, decoded, "s3cret", signature)


def test_non_finite_values_survive() -> None:
    decoded, _ = _wire(FAILED, "trial-4")
    assert isinstance(decoded, protocol.TrialResult) and math.isnan(decoded.accuracy or 0.0)
    assert decoded.reason == "TrialError" and decoded.speed == {} and decoded.model_size_bytes is None


def _fields(model: type[protocol.BaseModel]) -> set[str]:
    return set(model.model_fields)


@pytest.mark.parametrize("kind", ["baseline", "trial", "confirm"])
def test_every_field_has_a_row_in_the_metric_table(kind: str) -> None:
    model = protocol.RESULT_MODELS[kind]
    covered = (set(protocol.LABEL_FIELDS[kind]) | set(protocol.SCALAR_FIELDS[kind]) | set(protocol.MAP_FIELDS[kind])
               | set(protocol.SPEED_MAP_FIELDS[kind]))
    assert covered == _fields(model), "a result field the Prometheus path would drop"
    assert set(protocol.SPEED_FIELDS) == _fields(protocol.SpeedMeasurement)
    hints = typing.get_type_hints(model)
    assert all(hints[name] for name in covered)


def test_a_changed_result_no_longer_verifies() -> None:
    signature = protocol.sign_result(UID, "trial-3", TRIAL, "s3cret")
    forged = TRIAL.model_copy(update={"accuracy": 0.999})
    assert not protocol.verify_result(UID, "trial-3", forged, "s3cret", signature)
    assert not protocol.verify_result(UID, "trial-4", TRIAL, "s3cret", signature)  # replayed as another unit
    assert not protocol.verify_result(UID, "trial-3", TRIAL, "other", signature)
    assert not protocol.verify_result(UID, "trial-3", TRIAL, "s3cret", None)


def _pod(unit: str = "trial-3", phase: str = "Succeeded", attempt: int = 0, namespace: str = "ml",
         owner: str = UID, name: str | None = None) -> PodSummary:
    return PodSummary(name=name or c.unit_pod("digits", unit, attempt), namespace=namespace, job_uid=UID, unit=unit,
                      attempt=attempt, phase=phase, owner_uids=(owner,))


def _observed(unit: str = "trial-3", attempt: int = 0, result: protocol.Result = TRIAL,
              key: str = KEY) -> Observed:
    secret = protocol.derive_unit_secret(key, UID, unit, attempt)
    return Observed(unit, result, protocol.sign_result(UID, unit, result, secret))


def test_a_result_counts_only_from_its_own_finished_pod() -> None:
    assert judge(JOB, _observed(), _pod(), KEY) == ACCEPT
    assert judge(JOB, _observed(), _pod(phase="Running"), KEY) == WAIT
    assert judge(JOB, _observed(), None, KEY) == NO_POD
    # signed with a guessed or another attempt's secret
    assert judge(JOB, _observed(key="guess"), _pod(), KEY) == BAD_SIGNATURE
    assert judge(JOB, _observed(attempt=2), _pod(attempt=1), KEY) == BAD_SIGNATURE
    # an EARLIER attempt's own result (its pod deleted or lost after it pushed): stale, ignored quietly
    assert judge(JOB, _observed(attempt=0), _pod(attempt=1), KEY) == STALE
    unsigned = Observed("trial-3", TRIAL, None)
    assert judge(JOB, unsigned, _pod(), KEY) == BAD_SIGNATURE
    # a result of trial 3 presented for trial 4
    assert judge(JOB, _observed(unit="trial-4", result=TRIAL), _pod(unit="trial-4"), KEY) == WRONG_UNIT


def test_only_the_jobs_own_pods_count() -> None:
    pods = [_pod(), _pod(unit="trial-4", namespace="other"), _pod(unit="trial-5", owner="someone-else"),
            _pod(unit="trial-6", name="impostor"), _pod(unit="trial-7", attempt=0), _pod(unit="trial-7", attempt=2)]
    found = unit_pods(JOB, pods)
    assert set(found) == {"trial-3", "trial-7"} and found["trial-7"].attempt == 2


def test_prometheus_vector_to_observed_results() -> None:
    signature = protocol.sign_result(UID, "trial-3", TRIAL, "x")
    vector = []
    for sample in protocol.encode_result(TRIAL, signature):
        metric = {"__name__": sample.name, **sample.labels, "job": protocol.PUSH_JOB, "job_uid": UID,
                  "unit": "trial-3", "instance": ""}
        vector.append({"metric": metric, "value": [1700000000.1, repr(sample.value)]})
    vector.append({"metric": {"__name__": "qtune_result_accuracy", "job": protocol.PUSH_JOB, "job_uid": UID,
                              "unit": "trial-9"}, "value": [0, "0.5"]})  # no info series: not a result
    found = results_by_job(vector)
    assert set(found) == {UID} and set(found[UID]) == {"trial-3"}
    assert found[UID]["trial-3"].result == TRIAL and found[UID]["trial-3"].signature == signature


def test_termination_messages() -> None:
    text = protocol.termination_message("InvalidSpec", "spec.model.framework: unknown framework 'x'")
    assert protocol.parse_termination(text) == ("InvalidSpec", "spec.model.framework: unknown framework 'x'")
    assert protocol.parse_termination("segfault") == (None, "segfault")
    assert len(protocol.termination_message("X", "é" * 5000).encode()) <= protocol.TERMINATION_LIMIT


def test_a_busy_machines_figure_survives_the_wire() -> None:
    """How a figure was measured on a busy machine (fallback to one thread, CPU time, exclusive CPUs or
    not) crosses the Pushgateway intact; None (not known) stays None."""
    fell_back = _speed(16, 1.0, 2.0).model_copy(update={
        "threads": 1, "cpu_clock": True, "busy": True, "requested_threads": 4, "contended_rounds": 12,
        "exclusive_cpus": False})
    untrusted = _speed(1, 1.0, 7.0).model_copy(update={"busy": True, "trusted": False, "contended_rounds": 10,
                                                       "exclusive_cpus": True})
    result = TRIAL.model_copy(update={"speed": {"16": fell_back, "1": untrusted}})
    decoded, signature = _wire(result, "trial-3", secret="s3cret")
    assert decoded == result and protocol.verify_result(UID, "trial-3", decoded, "s3cret", signature)
    assert isinstance(decoded, protocol.TrialResult)
    assert decoded.speed["16"].fell_back and decoded.speed["16"].exclusive_cpus is False
    assert not decoded.speed["1"].trusted and not decoded.speed["1"].above(1.0)
    assert _wire(TRIAL, "trial-3")[0].speed["1"].exclusive_cpus is None  # type: ignore[union-attr]


def test_the_space_hash_is_signed_with_the_baseline_result() -> None:
    """The published space's sha256 crosses the wire with the baseline's result and under its signature: a
    result naming another space does not verify (issue 20)."""
    decoded, signature = _wire(BASELINE, "baseline", "s3cret")
    assert isinstance(decoded, protocol.BaselineResult) and decoded.space_sha256 == "9f" * 32
    assert protocol.verify_result(UID, "baseline", decoded, "s3cret", signature)
    other = decoded.model_copy(update={"space_sha256": "00" * 32})
    assert not protocol.verify_result(UID, "baseline", other, "s3cret", signature)


def test_the_element_count_is_checked_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    document = {"ops": [[1, 2], {"a": 3}]}
    data, binary = protocol.encode_document("space.json", document)
    assert protocol.structural_count(data["space.json"]) == 8  # {x2 [x2 ,x2 :x2
    assert protocol.decode_document({"data": data}, "space.json", element_limit=8) == document
    parsed: list[str] = []
    monkeypatch.setattr("qtune.wire.json.loads", lambda text: parsed.append(text))
    with pytest.raises(protocol.PayloadTooLarge, match="more than 7"):
        protocol.decode_document({"data": data}, "space.json", element_limit=7)
    data, binary = protocol.encode_document("space.json", document, plain_limit=0)
    with pytest.raises(protocol.PayloadTooLarge, match="more than 7"):
        protocol.decode_document({"binaryData": binary}, "space.json", element_limit=7)
    assert parsed == [], "refused before json.loads"
