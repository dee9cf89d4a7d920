"""Tensors with -inf / float-min calibration ranges (attention masks) stay fp32 and are reported."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_builders as builders
import pytest
from ort_helpers import QGraph, default_config, load, set_op

from qtune.adaptors.onnxrt import OnnxRuntimeAdaptor
from qtune.data import Dataset
from qtune.tuning import codec

SCORES = "scores/MatMulAddFusion"  # the mask Add is folded into the scores Gemm by pre-processing


def mask_data(mask_value: float | None = None) -> Dataset:
    data = builders.digits()
    inputs = builders.mlp_input(data["x_train"][:100])
    if mask_value is not None:
        row = np.where(np.arange(16) % 2 == 0, 0.0, mask_value).astype(np.float32)
        inputs["mask"] = np.tile(row, (100, 1))
    return Dataset(inputs, data["y_train"][:100])


@pytest.mark.parametrize("mask_value", [-np.inf, float(np.finfo(np.float32).min)], ids=["-inf", "float-min"])
def test_constant_mask_is_kept_fp32_and_reported(adaptor: OnnxRuntimeAdaptor, tmp_path: Path,
                                                 mask_value: float) -> None:
    model = load(adaptor, builders.save(builders.mask_proto(mask_value), tmp_path / "mask.onnx"))
    capability = adaptor.query_fw_capability(model)
    notes = capability["notes"]
    assert "tensor:mask" in notes, notes
    assert "mask" in notes[SCORES] and "kept fp32" in notes[SCORES]
    assert capability["opwise"][(SCORES, "Gemm")]["activation"]["dtype"] == ["fp32"]

    data = mask_data()
    for algorithm in ("minmax", "percentile", "kl"):  # percentile/kl must not crash on -inf
        cfg = default_config(capability)
        cfg = cfg.with_ops({name: set_op(cfg, name, activation={"algorithm": algorithm}).ops[name]
                            for name, op in cfg.ops.items() if not op.activation.is_fp32})
        quantized = adaptor.quantize(codec.dump(cfg), model, data.loader(32))
        excluded = adaptor.last_quantization["plan"]["excluded"]
        assert set(excluded) == {SCORES, "softmax"}, excluded
        assert "calibration range" in excluded["softmax"]
        graph = QGraph(quantized.path)
        masked = graph.node("softmax").input[0]
        assert graph.dq_of_input("softmax", 0) is None, "the -inf tensor is not quantized"
        assert all(c.op_type != "QuantizeLinear" for c in graph.consumers.get(masked, []))
        assert graph.dq_of_input("values", 1) is not None, "the rest stays int8"
        reference = adaptor.predict(model, data.loader(50))
        output = adaptor.predict(quantized, data.loader(50))
        assert np.isfinite(output).all()
        cosine = np.sum(output * reference, axis=1) / (
            np.linalg.norm(output, axis=1) * np.linalg.norm(reference, axis=1))
        assert cosine.mean() > 0.99, (algorithm, cosine.mean())


def test_mask_fed_as_input_is_found_by_calibration(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = builders.save(builders.mask_proto(-np.inf, mask_as_input=True), tmp_path / "mask_input.onnx")
    data = mask_data(-np.inf)
    adaptor = OnnxRuntimeAdaptor({"workspace": str(tmp_path / "ws")})
    model = load(adaptor, path)
    capability = adaptor.query_fw_capability(model)
    assert not any(note.startswith("tensor:") for note in capability["notes"]), "nothing to see statically"
    with caplog.at_level(logging.WARNING, logger="qtune.adaptors.onnxrt"):
        adaptor.quantize(codec.dump(default_config(capability)), model, data.loader(32))
    excluded = adaptor.last_quantization["plan"]["excluded"]
    assert "softmax" in excluded and "non-finite calibration range" in excluded["softmax"]
    assert "tensor:masked" in adaptor.notes
    assert any("softmax" in record.getMessage() and "fp32" in record.getMessage() for record in caplog.records)

    # a later capability query (this or another process) reports what calibration found
    fresh = OnnxRuntimeAdaptor({"workspace": str(tmp_path / "ws")})
    notes = fresh.query_fw_capability(load(fresh, path))["notes"]
    assert "tensor:masked" in notes and "kept fp32" in notes["softmax"]

    # or calibration data handed over up front
    upfront = OnnxRuntimeAdaptor({"workspace": str(tmp_path / "ws2"), "calibration_data": data})
    notes = upfront.query_fw_capability(load(upfront, path))["notes"]
    assert "tensor:masked" in notes


def test_keep_non_finite_fp32_can_be_turned_off(tmp_path: Path) -> None:
    path = builders.save(builders.mask_proto(-np.inf, mask_as_input=True), tmp_path / "mask_input.onnx")
    adaptor = OnnxRuntimeAdaptor({"workspace": str(tmp_path / "ws"),
                                  "quantization": {"keepNonFiniteFp32": False}})
    model = load(adaptor, path)
    cfg = default_config(adaptor.query_fw_capability(model))
    adaptor.quantize(codec.dump(cfg), model, mask_data(-np.inf).loader(32))
    assert "softmax" not in adaptor.last_quantization["plan"]["excluded"]
