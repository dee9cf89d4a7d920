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
