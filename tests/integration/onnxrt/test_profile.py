"""Per-op time shares from ORT's profiler, and fused groups by op name, on the hostile MLP."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sensitive_model import build_sensitive_mlp  # noqa: E402

from qtune.adaptors.onnxrt import OnnxRuntimeAdaptor  # noqa: E402
from qtune.data import Dataset  # noqa: E402
from qtune.spec.models import QuantizationSpec  # noqa: E402
from qtune.tuning import TuningSpace, build_space, codec  # noqa: E402


def test_time_shares_and_fused_groups_land_in_the_space(tmp_path):
    model_path, calib, _, sensitive = build_sensitive_mlp(tmp_path / "model")
    adaptor = OnnxRuntimeAdaptor({"workspace": str(tmp_path / "ws"), "threads": 1})
    model = adaptor.load_model({"path": str(model_path)})
    space = build_space(adaptor.query_fw_capability(model), QuantizationSpec(), adaptor.query_fused_patterns(model),
                        64)
    # every Gemm (MatMul+Add fused by the pre-optimisation) is grouped with its Relu, by name
    assert len(space.fused_groups) == 12
    assert all([space.ops[n].op_type for n in group] == ["Gemm", "Relu"] for group in space.fused_groups)
    x = np.load(calib)["input"]
    shares = adaptor.op_time_shares(model, codec.dump(space.default_config()), Dataset({"input": x}, None).loader(32),
                                    {"input": x[:64]}, 1)
    assert set(shares) == {"fp32", "int8"}
    # the Gemms carry nearly all of the fp32 time; shares are fractions of the fp32 total
    gemms = [n for n, op in space.ops.items() if op.op_type == "Gemm"]
    assert sum(shares["fp32"].get(n, 0.0) for n in gemms) > 0.7
    assert sum(shares["fp32"].values()) == pytest.approx(1.0, abs=1e-3)
    assert all(n in space.ops or n == "(other)" for n in shares["int8"])
    space.time_share = shares
    again = codec.load(TuningSpace, codec.dump(space))
    assert again.time_share == shares and again.fused_groups == space.fused_groups
    assert set(sensitive) <= set(gemms)
