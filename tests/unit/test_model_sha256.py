"""A per-trial figure end to end: the model's sha256 measured by the runner crosses the wire, is copied into the
trial's record (history.json, the history ConfigMap) and shows in the operator's per-trial status row."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from simulated import job_spec, simulated_space

from qtune import protocol
from qtune.operator import status as st
from qtune.protocol import TrialResult
from qtune.runner.trial import model_sha256
from qtune.tuning import codec
from qtune.tuning.history import Baseline, History
from qtune.tuning.session import TuningSession


def test_the_runner_hashes_a_model_file_and_a_model_folder(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"int8 weights")
    assert model_sha256(model) == hashlib.sha256(b"int8 weights").hexdigest()
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.bin").write_bytes(b"b")
    (folder / "sub" / "a.json").write_bytes(b"a")
    expected = hashlib.sha256(b"b.bin\0b" + b"sub/a.json\0a").hexdigest()
    assert model_sha256(folder) == expected


def test_the_sha256_crosses_the_wire_into_the_record_the_history_and_the_status(tmp_path: Path) -> None:
    space = simulated_space()
    history = History(job="sha", baseline=Baseline(accuracy=0.95))
    session = TuningSession(job_spec(), history, space, clock=lambda: 100.0)
    record = history.add(space.default_config())
    digest = hashlib.sha256(b"model").hexdigest()
    sent = TrialResult(trial=record.index, status="succeeded", config_key=record.config_key, accuracy=0.95,
                       model_path="/w/trial-0/model/model.onnx", model_sha256=digest)
    received, _ = protocol.decode_result(protocol.encode_result(sent))  # as Prometheus serves it to the operator
    assert isinstance(received, TrialResult) and received.model_sha256 == digest
    assert session.record_trial(received) is record and record.model_sha256 == digest
    history.save(tmp_path / "history.json")
    stored = json.loads((tmp_path / "history.json").read_text())
    assert stored["trials"][0]["model_sha256"] == digest
    assert codec.load(History, stored).trials[0].model_sha256 == digest
    row = st.trial_status(record, 32).dump()
    assert row["modelSha256"] == digest


def test_a_history_json_written_before_typed_values_loads_and_saves_in_the_same_shape(tmp_path: Path) -> None:
    """An older history.json: no model_sha256, a backoff and a confirmation as plain dicts, a derived `front`, a
    key nobody knows; it loads typed and is written back with the same keys (plus the new field)."""
    speed = {"batch_size": 32, "p50_ms": 5.0, "p90_ms": 5.5, "fp32_p50_ms": 10.0, "fp32_p90_ms": 11.0,
             "speedup": 2.0, "low": 1.9, "high": 2.1}
    FP32 = {"dtype": "fp32", "scheme": None, "granularity": None, "algorithm": None, "reduce_range": False}  # noqa: N806
    config = {"approach": "static", "format": "QDQ", "calibration_sampling_size": 100,
              "ops": {"a": {"op_type": "Relu", "activation": {"dtype": "uint8", "scheme": "asym",
                                                              "granularity": "per_tensor", "algorithm": "minmax",
                                                              "reduce_range": False}},
                      "b": {"op_type": "Conv", "activation": FP32, "weight": FP32}},
              "extras": {}}
    old = {"job": "old", "baseline": {"accuracy": 0.9, "latency_ms": {"32": 10.0}},
           "trials": [{"index": 0, "config_key": "k0", "tune_config": config, "status": "succeeded",
                       "accuracy": 0.9, "speed": {"32": speed}, "passed": True, "retired_field": 1}],
           "stop_reason": "GoalReached", "elapsed_seconds": 12.5,
           "confirmation": {"status": "succeeded", "candidates": [0], "speed": {"0": {"32": speed}}, "seconds": 1.0,
                            "trials_seen": 1},
           "backoff": {"trial": 0, "until": 30.0}, "front": {"entries": []}}
    history = codec.load(History, old)
    record = history.trials[0]
    assert record.tune_config.ops["b"].weight is not None and record.tune_config.ops["a"].weight is None
    assert record.speed_at(32).speedup == 2.0 and record.model_sha256 is None
    assert history.confirmation is not None and history.confirmation.trials_seen == 1
    assert history.confirmation.speed["0"]["32"].speedup == 2.0
    assert history.backoff is not None and history.backoff.until == 30.0
    written = codec.dump(history)
    assert set(written) == set(old) - {"front"} | {"started_at", "outcome", "message", "pinned", "attempts",
                                                   "queue_stops", "sequence"}
    assert written["trials"][0]["tune_config"] == config  # an op without weights has no weight key
    assert set(written["trials"][0]) == (set(old["trials"][0]) - {"retired_field"}) | {
        "model_size_bytes", "reason", "message", "timings", "peak_rss_bytes", "model_path", "proposed_by",
        "full_evaluation", "notes", "started_at", "finished_at", "model_sha256"}
    assert written["confirmation"] == {**old["confirmation"], "reason": None, "message": None,
                                       "speed": {"0": {"32": codec.dump(history.confirmation.speed["0"]["32"])}}}
    assert written["backoff"] == old["backoff"]
