"""evaluate / predict / benchmark: accuracy on real data, input checks, latency statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ort_helpers import default_config, load

from qtune.adaptors.base import LatencyStats
from qtune.adaptors.onnxrt import OnnxRuntimeAdaptor
from qtune.data import Dataset
from qtune.data.metrics import CosineSimilarity, TopK
from qtune.spec.errors import DataError
from qtune.tuning import codec


@pytest.mark.parametrize(("which", "floor"), [("mlp", 0.95), ("cnn", 0.9)])
def test_fp32_and_int8_accuracy(adaptor: OnnxRuntimeAdaptor, request: pytest.FixtureRequest, which: str,
                                floor: float) -> None:
    path: Path = request.getfixturevalue(f"{which}_path")
    data = request.getfixturevalue(f"{which}_data")
    model = load(adaptor, path)
    fp32 = adaptor.evaluate(model, data["eval"].loader(64), metric=TopK(1))
    assert fp32 >= floor, "the scikit-learn-trained weights classify digits"
    quantized = adaptor.quantize(codec.dump(default_config(adaptor.query_fw_capability(model))), model,
                                 data["calib"].loader(32))
    int8 = adaptor.evaluate(quantized, data["eval"].loader(64), metric=TopK(1))
    assert int8 >= fp32 - 0.03, (fp32, int8)


def test_evaluate_output_selection_postprocess_iteration(tmp_path: Path, mlp_path: Path, mlp_data) -> None:
    adaptor = OnnxRuntimeAdaptor({"workspace": str(tmp_path), "output": "logits", "threads": 1})
    model = load(adaptor, mlp_path)
    by_name = adaptor.evaluate(model, mlp_data["eval"].loader(100))
    by_post = adaptor.evaluate(model, mlp_data["eval"].loader(100), postprocess=lambda outputs: outputs[0])
    assert by_name == by_post
    first_batch = adaptor.evaluate(model, mlp_data["eval"].loader(100), iteration=1)
    assert 0.8 <= first_batch <= 1.0
    reference = adaptor.predict(model, mlp_data["eval"].loader(100))
    assert reference.shape == (len(mlp_data["eval"]), 10)
    same = adaptor.evaluate(model, Dataset(mlp_data["eval"].inputs, reference).loader(100),
                            metric=CosineSimilarity())
    assert same == pytest.approx(1.0)
    with pytest.raises(DataError, match="does not exist"):
        adaptor.predict(model, mlp_data["eval"].loader(100), output="nope")


@pytest.mark.parametrize(
    ("inputs", "pattern"),
    [
        ({"pixels": np.zeros((4, 65), np.float32)}, r"input 'pixels'.*expects shape \[N, 64\] float32, got \(4, 65\)"),
        ({"pixels": np.zeros((4, 8, 8), np.float32)}, r"input 'pixels'.*got \(4, 8, 8\)"),
        ({"pixels": np.zeros((4, 64), np.float64)}, r"input 'pixels'.*float32, got \(4, 64\) float64"),
        ({"image": np.zeros((4, 64), np.float32)}, r"input 'pixels' is missing.*\['image'\]"),
    ],
)
def test_wrong_input_is_a_data_error(adaptor: OnnxRuntimeAdaptor, mlp_path: Path, inputs, pattern: str) -> None:
    model = load(adaptor, mlp_path)
    loader = Dataset(inputs, np.zeros(4, np.int64)).loader(4)
    with pytest.raises(DataError, match=pattern):
        adaptor.evaluate(model, loader)
    with pytest.raises(DataError, match=pattern):
        cfg = default_config(adaptor.query_fw_capability(model))
        adaptor.quantize(codec.dump(cfg), model, loader)


def test_benchmark(adaptor: OnnxRuntimeAdaptor, cnn_path: Path, cnn_data) -> None:
    model = load(adaptor, cnn_path)
    batch = {name: array[:32] for name, array in cnn_data["eval"].inputs.items()}
    stats = adaptor.benchmark(model, batch, warmup=2, runs=10, threads=1)
    assert isinstance(stats, LatencyStats)
    assert stats.batch_size == 32 and stats.runs == 10 and stats.threads == 1
    assert 0 < stats.p50_ms <= stats.p90_ms and stats.mean_ms > 0
    with pytest.raises(DataError):
        adaptor.benchmark(model, {"pixels": np.zeros((2, 64), np.float32)}, warmup=0, runs=1, threads=1)


def test_sessions_are_cached(adaptor: OnnxRuntimeAdaptor, mlp_path: Path, mlp_data) -> None:
    model = load(adaptor, mlp_path)
    adaptor.evaluate(model, mlp_data["eval"].loader(300))
    first = adaptor._sessions.get(model.path, adaptor.info.get("threads"))
    adaptor.predict(model, mlp_data["eval"].loader(300))
    assert adaptor._sessions.get(model.path, adaptor.info.get("threads")) is first
