"""A deep MLP on scikit-learn digits that int8 breaks in exactly a few known ops (for tuning tests).

`build_sensitive_mlp(tmp_dir) -> (model_path, calib_npz, eval_npz, sensitive_op_names)`

The model: 12 hidden layers of 96 units (MatMul + Add + Relu each) and an output MatMul + Add, i.e. 13 MatMul
layers, trained by scikit-learn's MLPClassifier (seeded, 100 epochs, ~3 s) to ~97% on a held-out split. Then, for each
of 3 chosen layers L, it is made hostile to int8 *without changing the fp32 function*:

- layer L-1 gets one extra hidden unit with zero incoming weights and bias -1, so after its ReLU
  that unit is always exactly 0 (a dead unit);
- layer L's weight gets the matching extra row filled with an outlier 10^4 × max|W_L|.

fp32 output is unchanged (outlier × 0 = 0), but quantizing W_L to int8 — per tensor, and also per
channel since the outlier sits in every output column — makes its scale so large that every other
weight of the op rounds to 0: accuracy collapses unless exactly those ops stay fp32.

Files written to tmp_dir:
- `sensitive_mlp.onnx` (opset 17, input "input" float32 [N, 64], output "logits" float32 [N, 10]);
- `calib.npz`: "input" float32 [200, 64] (pixels / 16) and "labels" int64 [200] (training split);
- `eval.npz`: "input" float32 [597, 64] and "labels" int64 [597] (held-out split).
Each .npz holds one array per model input, keyed by the input name, plus "labels".

`sensitive_op_names` are the op names as they appear in the onnxruntime adaptor's capability
(its pre-optimisation fuses MatMul + Add into Gemm and renames the node, so they are read from the
adaptor's own optimised graph, matched through the weight initializer names which it keeps).
"""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
HIDDEN = (96,) * 12
HOSTILE_LAYERS = (3, 7, 10)
"""Indices of the MatMul layers (0-based, input layer = 0) made hostile to int8."""
OUTLIER_FACTOR = 1e4
CALIBRATION_SAMPLES = 200


@lru_cache(maxsize=1)
def _data() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return {"x_train": x[:1200], "y_train": y[:1200], "x_eval": x[1200:], "y_eval": y[1200:]}


@lru_cache(maxsize=4)
def train_mlp(hidden: tuple[int, ...], max_iter: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(weights, biases) of an MLP with these hidden widths trained on the digits split (deterministic)."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    data = _data()
    clf = MLPClassifier(hidden_layer_sizes=hidden, random_state=0, max_iter=max_iter, tol=1e-6, n_iter_no_change=30)
    # One BLAS thread: ~10x faster for these small matrices, and the same result on every machine.
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(data["x_train"], data["y_train"])
    return [w.astype(np.float32) for w in clf.coefs_], [b.astype(np.float32) for b in clf.intercepts_]


def _trained() -> tuple[list[np.ndarray], list[np.ndarray]]:
    return train_mlp(HIDDEN, 100)


def _hostile(weights: list[np.ndarray], biases: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Function-preserving edit: a dead unit in layer L-1, an outlier row in layer L's weight."""
    weights = [w.copy() for w in weights]
    biases = [b.copy() for b in biases]
    for layer in HOSTILE_LAYERS:
        previous = layer - 1
        # Dead unit: zero incoming weights, negative bias → ReLU output always 0.
        weights[previous] = np.concatenate([weights[previous], np.zeros((weights[previous].shape[0], 1),
                                                                        np.float32)], axis=1)
        biases[previous] = np.concatenate([biases[previous], np.array([-1.0], np.float32)])
        outlier = OUTLIER_FACTOR * float(np.abs(weights[layer]).max())
        signs = np.where(np.arange(weights[layer].shape[1]) % 2 == 0, 1.0, -1.0).astype(np.float32)
        weights[layer] = np.concatenate([weights[layer], (outlier * signs)[None, :]], axis=0)
    return weights, biases


def _proto(weights: list[np.ndarray], biases: list[np.ndarray]) -> onnx.ModelProto:
    nodes, initializers, previous = [], [], INPUT_NAME
    last = len(weights) - 1
    for index, (w, b) in enumerate(zip(weights, biases, strict=True)):
        initializers += [numpy_helper.from_array(w, f"layer{index}.weight"),
                         numpy_helper.from_array(b, f"layer{index}.bias")]
        nodes.append(helper.make_node("MatMul", [previous, f"layer{index}.weight"], [f"layer{index}.matmul"],
                                      name=f"layer{index}/MatMul"))
        out = OUTPUT_NAME if index == last else f"layer{index}.add"
        nodes.append(helper.make_node("Add", [f"layer{index}.matmul", f"layer{index}.bias"], [out],
                                      name=f"layer{index}/Add"))
        if index != last:
            nodes.append(helper.make_node("Relu", [out], [f"layer{index}.relu"], name=f"layer{index}/Relu"))
            previous = f"layer{index}.relu"
    graph = helper.make_graph(
        nodes, "sensitive_mlp",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", 10])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="qtune-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _optimized_names(model_path: Path) -> dict[str, str]:
    """weight initializer name → name of the op using it in the adaptor's optimised graph."""
    from qtune.adaptors.onnxrt import OnnxRuntimeAdaptor
    from qtune.adaptors.onnxrt.graph import GraphView, weight_inputs

    with tempfile.TemporaryDirectory(prefix="qtune-sensitive-") as workspace:
        adaptor = OnnxRuntimeAdaptor({"workspace": workspace})
        optimized = adaptor.optimized(adaptor.load_model({"framework": "onnxruntime", "path": str(model_path)}))
        view = GraphView(optimized.model.graph_only())
        return {weight: node.name for node in view.nodes for weight, _ in weight_inputs(node, view)}


def build_sensitive_mlp(tmp_dir: str | Path) -> tuple[Path, Path, Path, list[str]]:
    """Write the model and data (see the module docstring) and name the int8-hostile ops."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    weights, biases = _hostile(*_trained())
    model_path = tmp_dir / "sensitive_mlp.onnx"
    onnx.save_model(_proto(weights, biases), str(model_path))
    data = _data()
    calib_npz = tmp_dir / "calib.npz"
    eval_npz = tmp_dir / "eval.npz"
    np.savez(calib_npz, **{INPUT_NAME: data["x_train"][:CALIBRATION_SAMPLES],
                           "labels": data["y_train"][:CALIBRATION_SAMPLES]})
    np.savez(eval_npz, **{INPUT_NAME: data["x_eval"], "labels": data["y_eval"]})
    names = _optimized_names(model_path)
    sensitive = [names[f"layer{layer}.weight"] for layer in HOSTILE_LAYERS]
    return model_path, calib_npz, eval_npz, sensitive
