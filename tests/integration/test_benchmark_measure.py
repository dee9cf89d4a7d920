"""measure_against_fp32 / make_runner on real models: an ONNX CNN against its static int8 QDQ (and an
identical fp32 copy, whose true speedup is 1), and a PyTorch CNN against its int8 conversion."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("onnxruntime")
pytest.importorskip("sklearn")

HERE = Path(__file__).resolve().parent
for folder in (HERE / "onnxrt", HERE / "pytorch"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import onnx_builders as builders  # noqa: E402

from qtune.runner.benchmark import measure_against_fp32, measure_speed  # noqa: E402
from qtune.runner.context import JobContext  # noqa: E402
from qtune.spec.load import load_job  # noqa: E402
from qtune.spec.models import BenchmarkSpec  # noqa: E402
from qtune.tuning import codec  # noqa: E402

BATCHES = [1, 32]


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> JobContext:
    folder = tmp_path_factory.mktemp("bench")
    fp32, _ = builders.digits_cnn_with_int8(folder, calib_count=128, eval_count=20)
    shutil.copyfile(fp32, folder / "cnn_copy.onnx")
    spec = {
        "apiVersion": "qtune.io/v1alpha1", "kind": "QuantizationJob", "metadata": {"name": "bench"},
        "spec": {
            "model": {"framework": "onnxruntime", "path": "cnn.onnx"},
            "data": {"calibration": {"path": "calib.npz"}, "evaluation": {"path": "eval.npz", "metric": "top1"}},
            "tuning": {"objective": "latency"},
            "benchmark": {"batchSizes": BATCHES, "warmupRuns": 5, "runs": 30, "minRounds": 5, "maxSeconds": 4,
                          "targetPrecision": 0.03, "confidence": 0.99, "threads": 1},
            "output": {"path": str(folder / "out")},
        },
    }
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    return JobContext(load_job(folder / "job.yaml"), folder, folder / "workspace", threads=1)


def test_measure_against_fp32_at_two_batch_sizes(job: JobContext) -> None:
    models = {"int8": job.base_dir / "cnn_int8.onnx", "copy": job.base_dir / "cnn_copy.onnx"}
    result = measure_against_fp32(job, models)
    assert set(result) == {"int8", "copy"}
    for size in BATCHES:
        int8, copy = result["int8"][str(size)], result["copy"][str(size)]
        for m in (int8, copy):
            assert m.batch_size == size and m.threads == 1 and m.confidence == 0.99
            assert m.speedup == m.fp32_p50_ms / m.p50_ms
            assert 0 < m.low <= m.speedup <= m.high
            assert m.p90_ms >= m.p50_ms > 0 and m.fp32_p90_ms >= m.fp32_p50_ms > 0
            assert m.rounds >= 5 and m.rounds * m.runs_per_window >= 30
            assert m.seconds < 4 + 4  # budget, plus at worst warm-up overshoot and one round
        # one interleaved session per batch size: the fp32 figures are shared
        assert (int8.fp32_p50_ms, int8.rounds, int8.runs_per_window) == (copy.fp32_p50_ms, copy.rounds,
                                                                        copy.runs_per_window)
        # the fp32 copy runs the same graph: its interval must allow 1 (slack for what a
        # separate session's memory layout can honestly cost)
        assert copy.low * 0.9 <= 1.0 <= copy.high * 1.1, copy.describe()
    # the two batch sizes are different work: batch 32 costs more than batch 1
    assert result["int8"]["32"].fp32_p50_ms > result["int8"]["1"].fp32_p50_ms


def test_measure_against_fp32_of_nothing_is_empty(job: JobContext) -> None:
    assert measure_against_fp32(job, {}) == {}


def test_onnx_runner_checks_the_feed_once(job: JobContext) -> None:
    from qtune.spec.errors import DataError

    with pytest.raises(DataError):
        job.adaptor.make_runner(job.model, {"wrong": np.zeros((1, 1, 8, 8), np.float32)}, 1)
    run = job.adaptor.make_runner(job.model, job.benchmark_batches()[1], 1)
    assert run() is None


def test_pytorch_runner_against_its_int8_conversion(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import torch_models

    from qtune.adaptors import get_adaptor_class
    from qtune.data import Dataset
    from qtune.spec.models import QuantizationSpec
    from qtune.tuning.space import build_space

    images, labels = torch_models.digits()
    adaptor = get_adaptor_class("pytorch")({"workspace": str(tmp_path / "ws"), "threads": 1,
                                            "job_dir": str(HERE / "pytorch")})
    model = adaptor.load_model({"framework": "pytorch", "entrypoint": "torch_models:build_cnn",
                                "inputs": [{"name": "image", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]})
    space = build_space(adaptor.query_fw_capability(model), QuantizationSpec(approach="static"),
                        adaptor.query_fused_patterns(model), 64)
    calib = Dataset({"image": images[:64]}, labels[:64])
    quantized = adaptor.quantize(codec.dump(space.default_config("static")), model, calib.loader(32))
    batch = {"image": images[:16]}
    previous = torch.get_num_threads()
    try:
        runners = {"fp32": adaptor.make_runner(model, batch, 1), "int8": adaptor.make_runner(quantized, batch, 1)}
        assert torch.get_num_threads() == 1
        settings = BenchmarkSpec(warmup_runs=3, runs=20, min_rounds=5, max_seconds=3)
        int8 = measure_speed(runners, "fp32", batch_size=16, settings=settings, threads=1)["int8"]
    finally:
        torch.set_num_threads(previous)
    assert int8.speedup == int8.fp32_p50_ms / int8.p50_ms
    assert int8.low <= int8.speedup <= int8.high and int8.rounds >= 5
