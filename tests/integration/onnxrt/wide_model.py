"""A wide MLP on scikit-learn digits whose 4-bit weights break in exactly two known layers (weight-only tests).

`build_wide_mlp(folder) -> (model_path, calib_npz, eval_npz, hostile_weight_names)`

The model: hidden layers of 256 units (MatMul + Add + Relu each) and an output MatMul + Add, trained by
scikit-learn's MLPClassifier (seeded, one BLAS thread: deterministic, a few seconds) to ~97% on a held-out
split. Then two layers L are made hostile to 4-bit blocks *without changing the fp32 function*: layer L-1
gets 8 dead units (zero incoming weights, bias -1: always 0 after its ReLU), placed one in every 32 rows of
layer L's weight, whose matching rows hold an outlier OUTLIER × max|W_L| (outlier × 0 = 0 in fp32). Every
32-row block of W_L then has one outlier: in 4 bits its scale rounds most of the other 31 weights of the
block to 0 (accuracy collapses), in 8 bits they keep about 4.5 bits of precision (accuracy holds).

Files: `wide_mlp.onnx` (opset 17, input "input" float32 [N, 64], output "logits" [N, 10]), `calib.npz`
(200 training samples), `eval.npz` (597 held-out samples), each with "input" and "labels".
The hostile layers are named by their weight initializers (the adaptor's optimiser renames nodes; it keeps
initializer names).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sensitive_model import _data, train_mlp

HIDDEN = (256, 256, 256, 256)
HOSTILE_LAYERS = (2, 3)
"""Indices of the MatMul layers (0 = the input layer) made hostile to 4-bit blocks."""
OUTLIER = 10.0
BLOCK = 32


def _trained() -> tuple[list[np.ndarray], list[np.ndarray]]:
    return train_mlp(HIDDEN, 60)


def _hostile(weights: list[np.ndarray], biases: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    weights = [w.copy() for w in weights]
    biases = [b.copy() for b in biases]
    for layer in HOSTILE_LAYERS:
        previous, current = weights[layer - 1], weights[layer]
        width = previous.shape[1]
        dead = width // BLOCK
        new_width = width + dead
        dead_rows = [block * (BLOCK + 1) for block in range(dead)]
        live_rows = [i for i in range(new_width) if i not in dead_rows]
        w_prev = np.zeros((previous.shape[0], new_width), np.float32)
        w_prev[:, live_rows] = previous
        b_prev = np.full(new_width, -1.0, np.float32)
        b_prev[live_rows] = biases[layer - 1]
        w_cur = np.zeros((new_width, current.shape[1]), np.float32)
        w_cur[live_rows] = current
        w_cur[dead_rows] = OUTLIER * float(np.abs(current).max())
        weights[layer - 1], biases[layer - 1], weights[layer] = w_prev, b_prev, w_cur
    return weights, biases


def _model(weights: list[np.ndarray], biases: list[np.ndarray]) -> onnx.ModelProto:
    nodes, inits = [], []
    current = "input"
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        nodes.append(helper.make_node("MatMul", [current, f"W{i}"], [f"mm{i}"], name=f"matmul{i}"))
        last = i == len(weights) - 1
        out = "logits" if last else f"pre{i}"
        nodes.append(helper.make_node("Add", [f"mm{i}", f"B{i}"], [out], name=f"add{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"], name=f"relu{i}"))
            current = f"h{i}"
    graph = helper.make_graph(nodes, "wide_mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_wide_mlp(folder: Path) -> tuple[Path, Path, Path, list[str]]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights, biases = _hostile(*_trained())
    model_path = folder / "wide_mlp.onnx"
    onnx.save(_model(weights, biases), str(model_path))
    data = _data()
    calib = folder / "calib.npz"
    np.savez(calib, input=data["x_train"][:200], labels=data["y_train"][:200])
    evaluation = folder / "eval.npz"
    np.savez(evaluation, input=data["x_eval"], labels=data["y_eval"])
    return model_path, calib, evaluation, [f"W{layer}" for layer in HOSTILE_LAYERS]
