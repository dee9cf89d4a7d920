"""Status and conditions: transitions, projections of the history, merge patches."""

from __future__ import annotations

from opfakes import tiny_baseline, tiny_space

from qtune.operator import status as st
from qtune.protocol import SpeedMeasurement
from qtune.tuning import codec, stop
from qtune.tuning.best import summarize
from qtune.tuning.history import History


def _conds(conditions: list[dict]) -> dict[str, dict]:
    return {cond["type"]: cond for cond in conditions}


def test_conditions_of_each_state() -> None:
    table = {
        st.PENDING: (False, False, False, False),
        st.BASELINE: (False, True, False, False),
        st.RUNNING: (False, True, False, False),
        st.SUCCEEDED_STATE: (True, False, True, False),
        st.FAILED_STATE: (False, False, False, True),
    }
    for state, expected in table.items():
        conds = _conds(st.conditions_for(state, "R", "m", 3, None, now=0))
        got = tuple(conds[t]["status"] == "True" for t in (st.READY, st.RUNNING_COND, st.SUCCEEDED_COND,
                                                            st.FAILED_COND))
        assert got == expected, state
        assert all(c["observedGeneration"] == 3 and c["reason"] == "R" for c in conds.values())


def test_last_transition_time_moves_only_when_the_status_flips() -> None:
    first = st.conditions_for(st.BASELINE, st.REASON_BASELINE, "", 1, None, now=100)
    second = st.conditions_for(st.RUNNING, st.REASON_TUNING, "x", 1, first, now=200)
    assert _conds(second)[st.RUNNING_COND]["lastTransitionTime"] == st.now_iso(100)  # still True
    assert _conds(second)[st.RUNNING_COND]["reason"] == st.REASON_TUNING
    third = st.conditions_for(st.SUCCEEDED_STATE, stop.GOAL_REACHED, "done", 2, second, now=300)
    assert _conds(third)[st.RUNNING_COND]["lastTransitionTime"] == st.now_iso(300)  # flipped to False
    assert _conds(third)[st.SUCCEEDED_COND]["lastTransitionTime"] == st.now_iso(300)
    assert _conds(third)[st.FAILED_COND]["lastTransitionTime"] == st.now_iso(100)  # False all along
    assert [c["type"] for c in third] == list(st.CONDITION_TYPES)


def test_outcomes() -> None:
    assert st.state_for_outcome(stop.GOAL_REACHED) == st.SUCCEEDED_STATE
    assert st.state_for_outcome(stop.MAX_TRIALS) == st.SUCCEEDED_STATE
    assert st.state_for_outcome(stop.TIMEOUT) == st.SUCCEEDED_STATE
    assert st.state_for_outcome(stop.TOO_MANY_FAILURES) == st.SUCCEEDED_STATE  # with a passing best
    for reason in (stop.NO_CONFIG, stop.NO_SPEEDUP, st.INVALID_SPEC, st.BASELINE_FAILED, st.API_ERROR,
                   st.HISTORY_TOO_LARGE):
        assert st.state_for_outcome(reason) == st.FAILED_STATE


def _speed(p50: float, fp32: float = 10.0) -> SpeedMeasurement:
    return SpeedMeasurement(batch_size=32, p50_ms=p50, p90_ms=p50 * 1.1, fp32_p50_ms=fp32, fp32_p90_ms=fp32 * 1.1,
                            speedup=fp32 / p50, low=fp32 / p50 - 0.1, high=fp32 / p50 + 0.1, rounds=9)


def _history() -> History:
    space = tiny_space()
    history = History(job="digits", baseline=tiny_baseline())
    base = space.default_config()
    for i, config in enumerate([base, base.with_fallback(["fc"]), base.with_fallback(["fc", "conv2"])]):
        record = history.add(config)
        if i < 2:
            record.status = "succeeded"
            record.accuracy = 0.94 + 0.001 * i
            record.speed = {"32": _speed(5.0 + i)}
            record.model_size_bytes = 100_000 + 10_000 * i
            record.passed = True
    history.trials[0].passed = True
    return history


def test_best_speed_of_a_decode_job_says_decode_not_batch_1() -> None:
    history = _history()
    record = history.trials[0]
    decode = SpeedMeasurement(batch_size=1, p50_ms=20.0, p90_ms=22.0, fp32_p50_ms=30.0, fp32_p90_ms=33.0,
                              speedup=1.5, low=1.4, high=1.6, rounds=9)
    record.speed = {"decode": decode, "32": _speed(5.0)}
    best = st.best_status(summarize(record, history.baseline, record.speed_at("decode"), confirmed=False),
                          speed_key="decode")
    status = st.build_status(state=st.RUNNING, reason=st.REASON_TUNING, message="m", generation=2, old=None,
                             history=history, max_trials=10, batch_size="decode", best=best, recent=2,
                             history_configmap="h", workspace="/w", now=0)
    assert status["best"]["speed"]["batchSize"] == "decode" and status["best"]["speed"]["speedup"] == 1.5
    batch = st.best_status(summarize(record, history.baseline, record.speed_at(32), confirmed=False), speed_key=32)
    assert batch.speed is not None and batch.speed.batch_size == 32


def test_build_status_projects_the_history() -> None:
    history = _history()
    record = history.trials[0]
    best = st.best_status(summarize(record, history.baseline, record.speed_at(32), confirmed=False))
    status = st.build_status(state=st.RUNNING, reason=st.REASON_TUNING, message="m", generation=2, old=None,
                             history=history, max_trials=10, batch_size=32, best=best, recent=2,
                             history_configmap="digits-history", workspace="/w", now=0)
    assert status["progress"] == "2/10"
    assert status["trials"] == {"max": 10, "started": 3, "running": 1, "finished": 2, "succeeded": 2, "failed": 0,
                                "passed": 2}
    assert [t["index"] for t in status["recentTrials"]] == [1, 2]  # bounded, newest last
    assert status["recentTrials"][0]["speedup"] == round(10 / 6, 4)
    assert status["best"]["trial"] == 0
    # the winner's speed: one measurement (fp32 and int8 latencies from the same interleaved session)
    assert status["best"]["speedup"] == 2.0 and status["best"]["speedupInterval"] == "2.00 [1.90-2.10]"
    assert status["best"]["speed"] == {"batchSize": 32, "speedup": 2.0, "low": 1.9, "high": 2.1, "latencyMs": 5.0,
                                       "latencyP90Ms": 5.5, "fp32LatencyMs": 10.0, "fp32LatencyP90Ms": 11.0,
                                       "confidence": 0.95, "rounds": 9, "confirmed": False, "clock": "wall",
                                       "busy": False, "trusted": True}
    assert status["best"]["sizeRatio"] == 4.0
    assert status["best"]["tuneConfig"] == codec.dump(record.tune_config)
    assert status["baseline"]["accuracy"] == 0.95
    assert status["history"] == {"configMap": "digits-history", "trials": 3}
    assert "completionTime" not in status
    assert st.JobStatus.model_validate(status).dump() == status  # the model round-trips what it wrote


def test_the_status_model_rejects_unknown_keys() -> None:
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        st.JobStatus.model_validate({"state": "Running", "latencyMs": 3})


def test_merge_patch_replaces_stale_keys() -> None:
    old = {"best": {"trial": 1, "tuneConfig": {"ops": {"a": 1, "b": 2}}}, "state": "Running", "kopf": {"x": 1}}
    new = {"best": {"trial": 2, "tuneConfig": {"ops": {"c": 3}}}, "state": "Running"}
    patch = st.status_patch(old, new)
    assert patch == {"best": {"trial": 2, "tuneConfig": {"ops": {"a": None, "b": None, "c": 3}}}}
    assert st.status_patch(new, new) is None




def test_a_huge_winning_config_stays_out_of_the_status() -> None:
    from simulated import simulated_space

    history = History(job="big")
    small = history.add(tiny_space().default_config())
    big = history.add(simulated_space(count=2000).default_config())
    for record in (small, big):
        record.status, record.passed, record.accuracy = "succeeded", True, 0.95
    assert st.best_status(summarize(small, tiny_baseline(), None, False)).tune_config is not None
    best = st.best_status(summarize(big, tiny_baseline(), None, False))
    assert best.tune_config is None and "history ConfigMap" in (best.tune_config_omitted or "")
    assert len(best.model_dump_json()) < 4096


def test_the_status_names_the_metric() -> None:
    from qtune.tuning.history import Baseline

    shown = st.baseline_status(Baseline(accuracy=0.9575, metric="sequence_metrics:ExactMatch"))
    assert shown.metric == "sequence_metrics:ExactMatch"
    assert shown.model_dump(by_alias=True, exclude_none=True)["metric"] == "sequence_metrics:ExactMatch"


def _crd_status_schema() -> dict:
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    document = yaml.safe_load((root / "crds" / "quantizationjob.yaml").read_text())
    return document["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]


def _front_history(count: int) -> History:
    from dataclasses import replace

    """`count` passing configs, each less accurate and faster than the one before: all on the front."""
    space = tiny_space()
    history = History(job="digits", baseline=tiny_baseline())
    for i in range(count):
        config = space.default_config().with_fallback(["fc"] if i % 2 else [])
        record = history.add(replace(config, calibration_sampling_size=100 + i))
        record.status, record.passed, record.accuracy = "succeeded", i < count - 1, 0.95 - 0.001 * i
        record.speed = {"32": _speed(5.0 - 0.3 * i)}
        record.model_size_bytes = 100_000 - i
    return history


def test_the_status_names_a_bounded_front_around_the_winner() -> None:
    import jsonschema
    import pytest

    from qtune.tuning.front import accuracy_speed_front

    history = _front_history(9)
    winner = history.trials[6]
    front = st.front_status(accuracy_speed_front(history, 32, winner=winner.index), 32)
    assert front is not None and front.total == 9
    status = st.build_status(state=st.RUNNING, reason=st.REASON_TUNING, message="m", generation=1, old=None,
                             history=history, max_trials=10, batch_size=32,
                             best=st.best_status(summarize(winner, history.baseline, winner.speed_at(32), False)),
                             front=front, now=0)
    shown = status["front"]
    assert shown["batchSize"] == 32 and shown["total"] == 9
    assert [e["trial"] for e in shown["entries"]] == [4, 5, 6, 7, 8]  # at most 5, the winner's neighbours
    entry = shown["entries"][2]
    assert entry == {"trial": 6, "accuracy": 0.944, "passed": True, "speedup": round(10 / 3.2, 4),
                     "low": round(10 / 3.2 - 0.1, 4), "high": round(10 / 3.2 + 0.1, 4), "confirmed": False,
                     "modelSizeBytes": 99_994, "fp32Ops": 0, "winner": True}
    assert shown["entries"][-1]["passed"] is False  # a faster config that misses the criterion, marked
    # the winner's speedup is the same figure in status.best and in the front
    assert status["best"]["speedup"] == entry["speedup"] and status["best"]["trial"] == entry["trial"]
    assert st.JobStatus.model_validate(status).dump() == status
    schema = _crd_status_schema()
    jsonschema.Draft4Validator(schema).validate(status)  # what the API server stores
    too_long = {**status, "front": {**shown, "entries": shown["entries"] + shown["entries"][:1]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(schema).validate(too_long)
    with pytest.raises(ValueError):
        st.JobStatus.model_validate(too_long)


def test_no_measured_config_no_front() -> None:
    history = _front_history(0)
    assert st.front_status([], 32) is None
    status = st.build_status(state=st.RUNNING, reason=st.REASON_TUNING, message="m", generation=1, old=None,
                             history=history, max_trials=10, batch_size=32, now=0)
    assert "front" not in status
