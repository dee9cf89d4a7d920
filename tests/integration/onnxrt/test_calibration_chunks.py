"""Calibration in chunks under a memory budget, with real ONNX Runtime calibrators on real models:
chunking happens under a small budget, holds less memory than one collection call, and gives the
very ranges one call over all samples gives (MinMax, KL, percentile)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

SUPPORT = Path(__file__).resolve().parents[2] / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))

from tiny_onnx import save_tiny_classifier  # noqa: E402

from qtune.adaptors import memory  # noqa: E402
from qtune.adaptors.onnxrt import calibration as calib  # noqa: E402
from qtune.adaptors.onnxrt.budget import CALIBRATION_BATCH, MEMORY_FIELD  # noqa: E402
from qtune.tuning import codec  # noqa: E402

MIB = 1 << 20


class _Feeds:
    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def one_call(model: Path, op_types: list[str], algorithm: str, x: np.ndarray, tmp: Path) -> dict[str, tuple]:
    """ORT's own way (what quantize_static does): one collect_data call over every sample, one per run."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    calibrator = create_calibrator(model, op_types, augmented_model_path=str(tmp / f"one-{algorithm}.onnx"),
                                   calibrate_method=CalibrationMethod[calib.ORT_ALGORITHM_NAMES[algorithm]],
                                   extra_options=calib.HISTOGRAM_OPTIONS.get(algorithm, {}))
    calibrator.collect_data(_Feeds([{"x": x[i:i + 1]} for i in range(len(x))]))
    return ranges(calibrator.compute_data())


def ranges(tensors) -> dict[str, tuple]:
    return {name: tuple(np.asarray(v, dtype=np.float32).reshape(-1)[0] for v in tensors[name].range_value)
            for name in tensors.keys()}


def chunked(model: Path, op_types: list[str], algorithm: str, data: calib.CalibrationSet, cache: Path,
            limit: int | None) -> calib.Calibration:
    """qtune's calibration as a trial runs it: MinMax first, then `algorithm` seeded with it."""
    minmax = calib.calibrate(model, "model", data, "minmax", cache, op_types, memory_limit=limit)
    if algorithm == "minmax":
        return minmax
    return calib.calibrate(model, "model", data, algorithm, cache, op_types, memory_limit=limit,
                           seed_ranges=minmax.tensors)


@pytest.mark.parametrize("algorithm", ["minmax", "kl", "percentile"])
def test_chunked_ranges_equal_one_call_on_the_tiny_model(tmp_path: Path, algorithm: str) -> None:
    rng = np.random.default_rng(7)
    model = tmp_path / "tiny.onnx"
    save_tiny_classifier(model, rng)
    x = (rng.normal(size=(40, 4)) * rng.uniform(0.5, 3.0, size=(40, 1))).astype(np.float32)
    data = calib.CalibrationSet({"x": x}, len(x), "tiny40")
    op_types = ["MatMul", "Relu"]

    small = chunked(model, op_types, algorithm, data, tmp_path / "small", limit=1)
    assert small.plan is not None and small.plan.chunk == 1, "a budget below one sample: one sample per call"
    assert small.budget is not None and small.budget.source == MEMORY_FIELD
    large = chunked(model, op_types, algorithm, data, tmp_path / "large", limit=1 << 30)
    assert large.plan is not None and large.plan.chunk == CALIBRATION_BATCH
    reference = one_call(model, op_types, algorithm, x, tmp_path)

    assert set(reference) == set(ranges(small.tensors)) == set(ranges(large.tensors))
    assert {"x", "h", "r", "logits"} <= set(reference)
    assert ranges(small.tensors) == reference, "40 calls of one sample give what one call of 40 gives"
    assert ranges(large.tensors) == reference


def _save_conv_stack(path: Path, rng: np.random.Generator, channels: int = 32, layers: int = 4) -> None:
    """x [N, 8, 96, 96] -> (Conv 3x3 -> Relu) x layers: about 10 MB of calibrated tensors per sample."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, source, width = [], [], "x", 8
    for i in range(layers):
        weight = (rng.normal(size=(channels, width, 3, 3)) / np.sqrt(9 * width)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes.append(helper.make_node("Conv", [source, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        source, width = f"r{i}", channels
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 96, 96])],
                              [helper.make_tensor_value_info(source, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(onnx.shape_inference.infer_shapes(model), path)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc (Linux)")
def test_a_small_budget_bounds_what_a_histogram_calibration_holds(tmp_path: Path) -> None:
    import onnxruntime  # noqa: F401 - its import is not the calibration's memory

    if not memory._reset_peak():
        pytest.skip("the kernel refuses to reset the peak RSS here")
    rng = np.random.default_rng(3)
    model = tmp_path / "convs.onnx"
    _save_conv_stack(model, rng)
    x = rng.normal(size=(48, 8, 96, 96)).astype(np.float32)
    data = calib.CalibrationSet({"x": x}, len(x), "convs48")
    op_types = ["Conv", "Relu"]
    minmax = calib.calibrate(model, "convs", data, "minmax", tmp_path / "cache", op_types, memory_limit=48 * MIB)

    with memory.PeakWindow() as held_in_chunks:
        kl = calib.calibrate(model, "convs", data, "kl", tmp_path / "cache", op_types, memory_limit=48 * MIB,
                             seed_ranges=minmax.tensors)
    with memory.PeakWindow() as held_at_once:
        reference = one_call(model, op_types, "kl", x, tmp_path)

    assert kl.plan is not None
    per_sample = kl.plan.sample_bytes
    assert per_sample >= 8 * 32 * 96 * 96 * 4, "the probe sees at least the 8 conv/relu outputs of a sample"
    assert 1 <= kl.plan.chunk <= 48 * MIB // per_sample < len(x), "chunked: fewer samples per call than all"
    assert kl.peak_exact and kl.peak_rss_bytes is not None and kl.peak_rss_bytes >= (held_in_chunks.start_bytes or 0)
    # one call holds every sample's tensors (~470 MB); the chunks hold a few samples' worth
    assert (held_at_once.added_bytes or 0) > 0.8 * len(x) * per_sample / 1.5
    assert (held_in_chunks.added_bytes or 0) < 48 * MIB + 64 * MIB, "the budget plus a session's own memory"
    assert (held_in_chunks.added_bytes or 0) * 3 < (held_at_once.added_bytes or 0)
    assert ranges(kl.tensors) == reference, "the same KL thresholds as one call over all 48 samples"


def test_the_adaptor_calibrates_within_the_jobs_limit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from qtune.adaptors.onnxrt import OnnxRuntimeAdaptor
    from qtune.data import Dataset
    from qtune.spec.models import QuantizationSpec
    from qtune.tuning.space import build_space

    rng = np.random.default_rng(1)
    path = tmp_path / "tiny.onnx"
    save_tiny_classifier(path, rng)
    adaptor = OnnxRuntimeAdaptor({"workspace": str(tmp_path / "ws"), "threads": 1, "calibration_memory_limit": 1})
    model = adaptor.load_model({"path": str(path)})
    cfg = build_space(adaptor.query_fw_capability(model), QuantizationSpec(), [], 30).default_config("static")
    calibration = Dataset({"x": rng.normal(size=(30, 4)).astype(np.float32)}, None)
    with caplog.at_level(logging.INFO, logger="qtune.adaptors.onnxrt.calibration"):
        adaptor.quantize(codec.dump(cfg), model, calibration.loader(16))
    assert "1 samples per call" in caplog.text and MEMORY_FIELD in caplog.text
    assert len(adaptor.calibration_peaks) == 1 and adaptor.calibration_peaks[0] > 0
    adaptor.quantize(codec.dump(cfg), model, calibration.loader(16))
    assert len(adaptor.calibration_peaks) == 1, "a cached calibration measures nothing, so reports no peak"
