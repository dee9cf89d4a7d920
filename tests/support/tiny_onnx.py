"""A tiny ONNX classifier (4 inputs -> 16 ReLU -> 3 logits, random weights) for tests that need a real
model file but not a trained one: error paths, metrics, data checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_tiny_classifier(path: Path, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Write the model to `path` (input `x` [N, 4], output `logits` [N, 3]); returns its weights (w1, w2)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1, w2 = rng.normal(size=(4, 16)).astype(np.float32), rng.normal(size=(16, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["logits"], name="mm2")], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return w1, w2
