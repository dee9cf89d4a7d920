"""Deterministic small ONNX models on real data (scikit-learn digits), built in code.

- an MLP whose weights are trained by scikit-learn's MLPClassifier;
- a CNN: two fixed random convolutions (seeded) + ReLU/MaxPool, and a Gemm classifier trained by
  scikit-learn's LogisticRegression on those features;
- an attention-like graph with a -inf/float-min mask (constant or fed as an input).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT = "pixels"


@lru_cache(maxsize=1)
def digits() -> dict[str, np.ndarray]:
    """Digits 8x8 scaled to [0, 1]; fixed split: 1197 train, 600 eval; calibration = first 100 train."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return {"x_train": x[:1197], "y_train": y[:1197], "x_eval": x[1197:], "y_eval": y[1197:]}


def _model(nodes: list, inputs: list, outputs: list, initializers: list, opset: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "qtune_test", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="qtune-tests")
    model.ir_version = 8 if opset <= 17 else 9
    onnx.checker.check_model(model)
    return model


@lru_cache(maxsize=4)
def _trained_mlp(hidden: tuple[int, ...]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    data = digits()
    clf = MLPClassifier(hidden_layer_sizes=hidden, random_state=0, max_iter=300, tol=1e-5)
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(data["x_train"], data["y_train"])
    return [w.astype(np.float32) for w in clf.coefs_], [b.astype(np.float32) for b in clf.intercepts_]


def mlp_proto(hidden: tuple[int, ...] = (64, 32), opset: int = 17) -> onnx.ModelProto:
    weights, biases = _trained_mlp(hidden)
    nodes, inits, prev = [], [], INPUT
    for index, (w, b) in enumerate(zip(weights, biases, strict=True)):
        inits += [numpy_helper.from_array(w, f"fc{index}.weight"), numpy_helper.from_array(b, f"fc{index}.bias")]
        nodes.append(helper.make_node("MatMul", [prev, f"fc{index}.weight"], [f"fc{index}.mm"],
                                      name=f"fc{index}/MatMul"))
        last = index == len(weights) - 1
        out = "logits" if last else f"fc{index}.out"
        nodes.append(helper.make_node("Add", [f"fc{index}.mm", f"fc{index}.bias"], [out], name=f"fc{index}/Add"))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"fc{index}.relu"], name=f"fc{index}/Relu"))
            prev = f"fc{index}.relu"
    return _model(nodes, [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 64])],
                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits, opset)


def _conv_features(x: np.ndarray, k1: np.ndarray, k2: np.ndarray) -> np.ndarray:
    """numpy reference of the CNN's feature extractor (used to train the classifier)."""
    import onnxruntime as ort

    proto = cnn_proto(k1, k2, None, None)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["features"], {INPUT: x.reshape(-1, 1, 8, 8)})[0]


@lru_cache(maxsize=1)
def _trained_cnn() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(1)
    k1 = (rng.normal(size=(8, 1, 3, 3)) / 3.0).astype(np.float32)
    k2 = (rng.normal(size=(16, 8, 3, 3)) / np.sqrt(72)).astype(np.float32)
    data = digits()
    features = _conv_features(data["x_train"], k1, k2)
    clf = LogisticRegression(max_iter=2000, C=1.0)
    with threadpool_limits(1):
        clf.fit(features, data["y_train"])
    return k1, k2, clf.coef_.astype(np.float32), clf.intercept_.astype(np.float32)


def cnn_proto(k1: np.ndarray | None = None, k2: np.ndarray | None = None, fc_w: np.ndarray | None = None,
              fc_b: np.ndarray | None = None, opset: int = 17) -> onnx.ModelProto:
    if k1 is None:
        k1, k2, fc_w, fc_b = _trained_cnn()
    inits = [numpy_helper.from_array(k1, "conv1.weight"),
             numpy_helper.from_array(np.zeros(8, np.float32), "conv1.bias"),
             numpy_helper.from_array(k2, "conv2.weight"),
             numpy_helper.from_array(np.zeros(16, np.float32), "conv2.bias")]
    nodes = [
        helper.make_node("Conv", [INPUT, "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["features"], name="flatten", axis=1),
    ]
    outputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 256])]
    if fc_w is not None:
        inits += [numpy_helper.from_array(fc_w, "fc.weight"), numpy_helper.from_array(fc_b, "fc.bias")]
        nodes.append(helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])]
    return _model(nodes, [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 1, 8, 8])],
                  outputs, inits, opset)


def mask_proto(mask_value: float = -np.inf, mask_as_input: bool = False) -> onnx.ModelProto:
    """scores = x @ Wq; scores + mask → Softmax → @ Wv → logits. The mask holds `mask_value` in
    half of the positions: a BERT-style attention mask."""
    rng = np.random.default_rng(2)
    wq = rng.normal(size=(64, 16)).astype(np.float32) / 8
    wv = rng.normal(size=(16, 10)).astype(np.float32)
    mask = np.where(np.arange(16) % 2 == 0, 0.0, mask_value).astype(np.float32).reshape(1, 16)
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(wv, "wv")]
    inputs = [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", 64])]
    if mask_as_input:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 16]))
    else:
        inits.append(numpy_helper.from_array(mask, "mask"))
    nodes = [
        helper.make_node("MatMul", [INPUT, "wq"], ["scores"], name="scores"),
        helper.make_node("Add", ["scores", "mask"], ["masked"], name="add_mask"),
        helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "wv"], ["logits"], name="values"),
    ]
    return _model(nodes, inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits, 17)


def save(proto: onnx.ModelProto, path: Path, external: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=0)
    else:
        onnx.save_model(proto, str(path))
    return path


def mlp_input(x: np.ndarray) -> dict[str, np.ndarray]:
    return {INPUT: x.astype(np.float32)}


def cnn_input(x: np.ndarray) -> dict[str, np.ndarray]:
    return {INPUT: x.reshape(-1, 1, 8, 8).astype(np.float32)}


def digits_cnn_with_int8(folder: Path, calib_count: int, eval_count: int) -> tuple[Path, Path]:
    """The digits CNN (cnn.onnx) and its static int8 QDQ (cnn_int8.onnx, ORT's own quantize_static) in
    `folder`, with calib.npz / eval.npz of the first `calib_count` / `eval_count` images: a real
    fp32/int8 pair to measure."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    data = digits()
    fp32 = save(cnn_proto(), folder / "cnn.onnx")
    calib = cnn_input(data["x_train"][:calib_count])[INPUT]

    class Reader:  # onnxruntime.quantization's CalibrationDataReader over batches of 16
        def __init__(self) -> None:
            self._batches = iter([{INPUT: calib[i:i + 16]} for i in range(0, len(calib), 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    int8 = folder / "cnn_int8.onnx"
    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    np.savez(folder / "eval.npz", **{INPUT: cnn_input(data["x_eval"][:eval_count])[INPUT],
                                     "labels": data["y_eval"][:eval_count]})
    np.savez(folder / "calib.npz", **{INPUT: calib, "labels": data["y_train"][:calib_count]})
    return fp32, int8
