"""SmoothQuant through the adaptor on a trained transformer with LayerNorm outlier channels
(examples/outlier_transformer, built into a temporary folder): exact in fp32, better in int8."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from qtune.adaptors.onnxrt import OnnxRuntimeAdaptor
from qtune.data import Dataset
from qtune.spec.models import QuantizationSpec, SmoothQuantSpec
from qtune.tuning import codec
from qtune.tuning.space import SMOOTH_QUANT, build_space

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def outlier_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built in a process of its own: the build sets torch's global state (deterministic algorithms, thread
    counts) that would leak into the rest of the test session."""
    pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("outlier-transformer")
    subprocess.run([sys.executable, str(ROOT / "examples" / "outlier_transformer" / "build.py"), "--out", str(folder)],
                   check=True, cwd=ROOT)
    return folder / "model.onnx"


def _data(path: Path, limit: int | None = None) -> Dataset:
    with np.load(path) as data:
        return Dataset({"image": data["image"][:limit]}, data["labels"][:limit])


def _top1(adaptor: OnnxRuntimeAdaptor, model: object, data: Dataset) -> float:
    return float((np.argmax(adaptor.predict(model, data.loader(100)), axis=-1) == data.labels).mean())


def test_smooth_quant_keeps_fp32_and_lifts_int8(outlier_model: Path, tmp_path: Path) -> None:
    adaptor = OnnxRuntimeAdaptor({"workspace": str(tmp_path / "ws"), "threads": 1})
    model = adaptor.load_model({"framework": "onnxruntime", "path": str(outlier_model)})
    calib, evaluation = _data(outlier_model.parent / "calib.npz", 200), _data(outlier_model.parent / "eval.npz")
    space = build_space(adaptor.query_fw_capability(model),
                        QuantizationSpec(approach="static", smooth_quant=SmoothQuantSpec(alpha=0.5)), [], 200)
    assert space.smooth_quant_alphas == [0.5]
    smoothed_cfg = space.default_config("static")
    assert smoothed_cfg.extras == {SMOOTH_QUANT: 0.5}
    plain_cfg = replace(smoothed_cfg, extras={})

    plain = _top1(adaptor, adaptor.quantize(codec.dump(plain_cfg), model, calib.loader(50)), evaluation)
    smoothed_model = adaptor.quantize(codec.dump(smoothed_cfg), model, calib.loader(50))
    record = adaptor.last_quantization["smooth_quant"]
    smoothed = _top1(adaptor, smoothed_model, evaluation)
    fp32 = _top1(adaptor, model, evaluation)
    # every LayerNorm output had outliers: each is smoothed, folded into the LayerNorm (fused or not)
    assert len(record["groups"]) >= 4 and not record["inserted"], record
    assert smoothed > plain + 0.01, (plain, smoothed, fp32)
    assert smoothed >= fp32 * 0.99

    # the smoothed fp32 model (what was quantized) computes what the original does, on real inputs
    folder = next((tmp_path / "ws" / "smoothed").glob("*-a0.5-*"))
    fp32_smoothed = adaptor.load_model({"framework": "onnxruntime", "path": str(folder / "model.onnx")})
    inputs = {"image": evaluation.inputs["image"][:200]}
    np.testing.assert_allclose(adaptor.run(fp32_smoothed, inputs)[0], adaptor.run(model, inputs)[0],
                               rtol=1e-3, atol=1e-3)
