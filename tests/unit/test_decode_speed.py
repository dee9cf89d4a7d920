"""Decode speed as a measured objective (spec.benchmark.decode, qtune.runner.decode_speed): a tiny decoder with
a KV cache (d_model 64, 2 heads, one layer), built here, through real ONNX Runtime.

No speed claim is asserted (figures exist, are positive and come with their interval): which model is faster
belongs in benchmarks/, on quiet CPUs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from tiny_decoder import HEADS, D, decoder, job_context, plain  # noqa: E402

from qtune.spec.errors import SpecError  # noqa: E402


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    decoder(tmp_path / "decoder.onnx")
    decoder(tmp_path / "other.onnx", seed=3)
    plain(tmp_path / "plain.onnx")
    return tmp_path


def test_the_layout_pairs_each_past_with_its_present_and_the_loop_feeds_it_back(folder: Path) -> None:
    from qtune.runner.decode_speed import DecodeLoop, kv_layout

    job = job_context(folder, "decoder.onnx", {"decode": {"promptTokens": 5, "newTokens": 3}})
    model = job.adaptor.step_model(job.model, 1)
    layout = kv_layout(model)
    assert [(past, model.outputs[index]) for past, index in layout.pairs] == [
        ("past_key_values.0.key", "present.0.key"), ("past_key_values.0.value", "present.0.value")]
    assert all(array.shape == (1, HEADS, 0, D // HEADS) for array in layout.empty.values())
    loop = DecodeLoop(model, layout, np.arange(8), prompt=5, new=3)
    lengths = []
    for _ in range(7):
        loop()
        lengths.append(loop.cache["past_key_values.0.key"].shape[2])
    assert lengths == [6, 7, 8, 6, 7, 8, 6]  # the prompt's 5, one per step, then again from the prompt's cache


def test_prefill_and_decode_are_measured_interleaved_with_intervals(folder: Path) -> None:
    from qtune.runner.benchmark import measure_against_fp32
    from qtune.tuning.session import objective_batch_size

    job = job_context(folder, "decoder.onnx", {"decode": {"promptTokens": 12, "newTokens": 6}})
    assert objective_batch_size(job.spec) == "decode" and job.spec.benchmark.measured_batch_sizes == []
    result = measure_against_fp32(job, {"other": folder / "other.onnx"})
    assert set(result["other"]) == {"prefill", "decode"}  # no batch sizes: withBatchSizes is not set
    for measured in result["other"].values():
        assert measured.batch_size == 1 and measured.p50_ms > 0 and measured.fp32_p50_ms > 0
        assert 0 < measured.low <= measured.speedup <= measured.high and measured.rounds >= 3
        assert measured.trusted in (True, False) and measured.confidence == 0.95


def test_batch_sizes_given_beside_decode_are_measured_too(folder: Path) -> None:
    from qtune.runner.baseline import measure_latency
    from qtune.runner.benchmark import measure_against_fp32

    job = job_context(folder, "decoder.onnx", {"decode": {"promptTokens": 4, "newTokens": 2, "withBatchSizes": True},
                                       "batchSizes": [2]})
    assert set(measure_against_fp32(job, {"other": folder / "other.onnx"})["other"]) == {"2", "prefill", "decode"}
    p50, p90 = measure_latency(job, job.model)
    assert set(p50) == set(p90) == {"2", "prefill", "decode"} and all(v > 0 for v in p50.values())


def test_a_model_without_a_cache_is_refused_naming_the_field(folder: Path) -> None:
    from qtune.runner.benchmark import measure_against_fp32

    job = job_context(folder, "plain.onnx", {"decode": {}})
    with pytest.raises(SpecError, match=r"spec\.benchmark\.decode: the model has no KV cache.*past inputs \[\]"):
        measure_against_fp32(job, {"copy": folder / "plain.onnx"})


def test_the_objective_key_prefers_decode() -> None:
    from qtune.tuning.history import default_speed_key

    assert default_speed_key(["1", "32", "prefill", "decode"]) == "decode"
    assert default_speed_key(["1", "32", "prefill"]) == "32"
    assert default_speed_key([]) is None


def test_the_spec_names_a_bad_decode_field(tmp_path: Path) -> None:
    from qtune.spec.errors import SpecError as LoadError

    decoder(tmp_path / "decoder.onnx")
    with pytest.raises(LoadError, match=r"spec\.benchmark\.decode\.promptTokens"):
        job_context(tmp_path, "decoder.onnx", {"decode": {"promptTokens": 0}})


def test_surfaces_name_the_decode_figure() -> None:
    from qtune.tuning.front import front_document
    from qtune.tuning.history import speed_key_text

    assert front_document([], "decode")["batch_size"] == "decode" and front_document([], "32")["batch_size"] == 32
    assert speed_key_text(32) == "batch 32" and speed_key_text("decode").startswith("decode (per new token")


def test_the_report_of_a_decode_job_gives_tokens_per_second_and_the_prompt_time(tmp_path: Path) -> None:
    from qtune.protocol import SpeedMeasurement
    from qtune.report.report import summary_items
    from qtune.tuning.config import TuneConfig
    from qtune.tuning.history import SUCCEEDED, Baseline, History, TrialRecord
    from qtune.tuning.session import TuningSession

    decoder(tmp_path / "decoder.onnx")
    job = job_context(tmp_path, "decoder.onnx", {"decode": {}}).job

    def figure(fp32: float, ms: float) -> SpeedMeasurement:
        return SpeedMeasurement(batch_size=1, p50_ms=ms, p90_ms=ms, fp32_p50_ms=fp32, fp32_p90_ms=fp32,
                                speedup=fp32 / ms, low=0.9 * fp32 / ms, high=1.1 * fp32 / ms, rounds=5, threads=1)

    record = TrialRecord(0, "k", TuneConfig("weight_only", "QDQ", {}), status=SUCCEEDED, accuracy=10.0,
                         passed=True, model_size_bytes=1,
                         speed={"decode": figure(20.0, 5.0), "prefill": figure(90.0, 60.0)})
    history = History("decode", baseline=Baseline(accuracy=10.0, latency_ms={"decode": 20.0}), trials=[record])
    items = dict(summary_items(job, TuningSession(job.spec, history)))
    assert "(50.0 → 200.0 tokens/s)" in items["speed at decode (per new token, batch 1) (in-trial figure)"]
    assert items["speed at prefill (the prompt, batch 1)"].startswith("fp32 90.000 ms → 60.000 ms: 1.50×")
