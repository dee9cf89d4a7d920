"""A weight-only job with decode speed as its objective, through `qtune tune`'s engine (qtune.local.tune) on the
tiny KV-cache decoder of tests/support/tiny_decoder.py: the baseline, the trials and the confirmation measure
prefill and decode (and no batch size), the objective is the time per token, the report says so."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from tiny_decoder import decoder, write_job  # noqa: E402

from qtune.local import tune  # noqa: E402
from qtune.spec import load_job  # noqa: E402


def test_a_weight_only_decode_job_runs_end_to_end(tmp_path: Path) -> None:
    decoder(tmp_path / "decoder.onnx")
    job_file = write_job(tmp_path, "decoder.onnx", {"decode": {"promptTokens": 8, "newTokens": 4}},
                         quantization={"approach": "weight_only"},
                         tuning={"maxTrials": 2, "accuracyCriterion": {"relative": 0.5}, "minSpeedup": 0.01,
                                 "confirmCandidates": 1})
    job = load_job(job_file)
    outcome = tune(job, job_file, output_dir=tmp_path / "out", workspace=tmp_path / "ws")
    assert set(outcome.baseline.latency_ms) == {"prefill", "decode"}
    assert outcome.session.batch_size == "decode"
    measured = [t for t in outcome.history.trials if t.speed]
    assert measured and all(set(t.speed) == {"prefill", "decode"} for t in measured)
    assert all(t.speed_at() is t.speed["decode"] for t in measured)
    best = outcome.best
    assert best is not None and outcome.session.best_speed() is not None
    report = (tmp_path / "out" / "report.md").read_text()
    assert "speed at decode (per new token, batch 1)" in report and "tokens/s" in report
    assert "speed at prefill (the prompt, batch 1)" in report
