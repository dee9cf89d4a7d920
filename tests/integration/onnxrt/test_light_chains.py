"""A hard-swish between two Convs runs int8 end to end (issue 18): the division by 6 becomes a Mul
(qtune/adaptors/onnxrt/reciprocal.py, same outputs), the capability declares the Add/Clip/Mul group as a light
chain with the two Convs as its ends (chains.py), and quantizing the chain with its ends leaves ONNX Runtime's
optimised graph with no DequantizeLinear between the Convs (QLinearAdd/QLinearMul instead)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from qtune.adaptors.onnxrt.capability import build_capability
from qtune.adaptors.onnxrt.graph import GraphView
from qtune.adaptors.onnxrt.reciprocal import divisions_as_multiplications

RNG = np.random.default_rng(0)
HARD_SWISH = ["add3", "clip", "mul_x", "div6"]


def _const(name: str, value: np.ndarray | float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _model(tail_divisor: str = "six") -> onnx.ModelProto:
    """x -> Conv a -> hard-swish (Add 3, Clip 0..6, Mul by itself, Div 6) -> Conv b -> Div(`tail_divisor`) -> y."""
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["a", "three"], ["a3"], name="add3"),
        helper.make_node("Clip", ["a3", "zero", "six"], ["c"], name="clip"),
        helper.make_node("Mul", ["a", "c"], ["m"], name="mul_x"),
        helper.make_node("Div", ["m", "six"], ["h"], name="div6"),
        helper.make_node("Conv", ["h", "wb", "bb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Div", ["b", tail_divisor], ["y"], name="div_tail"),
    ]
    initializers = [_const("wa", RNG.normal(size=(8, 3, 3, 3))), _const("ba", RNG.normal(size=8)),
                    _const("wb", RNG.normal(size=(4, 8, 3, 3)) / 8), _const("bb", RNG.normal(size=4)),
                    _const("three", 3.0), _const("zero", 0.0), _const("six", 6.0)]
    graph = helper.make_graph(nodes, "hard_swish",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 16, 16])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return onnx.shape_inference.infer_shapes(model)  # as quant_pre_process leaves it: every tensor typed


def _run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_a_division_by_a_constant_becomes_a_multiplication_with_the_same_outputs() -> None:
    proto = _model()
    x = RNG.normal(size=(2, 3, 16, 16)).astype(np.float32)
    before = _run(proto, x)

    assert divisions_as_multiplications(proto) == 2
    onnx.checker.check_model(proto)
    assert Counter(node.op_type for node in proto.graph.node)["Div"] == 0
    np.testing.assert_allclose(_run(proto, x), before, rtol=1e-6, atol=1e-6)


def test_a_division_by_zero_or_by_a_tensor_stays_a_division() -> None:
    proto = _model(tail_divisor="zero")
    proto.graph.node[4].input[1] = "a"  # div6 now divides by a tensor, not a constant
    assert divisions_as_multiplications(proto) == 0
    assert Counter(node.op_type for node in proto.graph.node)["Div"] == 2


def test_the_hard_swish_is_a_light_chain_between_its_convs() -> None:
    proto = _model()
    without_rewrite = build_capability(GraphView(proto))
    assert without_rewrite["light_chains"] == [], "the Div (no int8 kernel) is an fp32 boundary"

    divisions_as_multiplications(proto)
    capability = build_capability(GraphView(proto))
    assert capability["light_chains"] == [{"ops": HARD_SWISH, "ends": ["conv_a", "conv_b"]}]


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[np.ndarray]) -> None:
        self.batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {"x": batch}


def _dequantize_count(path: Path, tmp_path: Path) -> Counter[str]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def test_quantized_with_its_ends_the_chain_runs_int8_without_a_dequantize_between_the_convs(tmp_path: Path) -> None:
    proto = _model()
    divisions_as_multiplications(proto)
    source = tmp_path / "model.onnx"
    onnx.save(proto, source)
    batches = [RNG.normal(size=(2, 3, 16, 16)).astype(np.float32) for _ in range(4)]
    counts = {}
    for tag, nodes in (("convs", ["conv_a", "conv_b"]), ("chain", ["conv_a", "conv_b", *HARD_SWISH])):
        target = tmp_path / f"{tag}.onnx"
        quantize_static(str(source), str(target), _Reader(batches), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv", "Add", "Clip", "Mul"], per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                        extra_options={"ActivationSymmetric": False})
        counts[tag] = _dequantize_count(target, tmp_path)
    # after conv_a, one per fp32 consumer of the hard-swish (ORT gives each its own), and after conv_b
    assert counts["convs"]["DequantizeLinear"] == 3, counts
    assert counts["chain"]["DequantizeLinear"] == 1, counts  # only the model's output
    assert counts["chain"]["QLinearAdd"] == 1 and counts["chain"]["QLinearMul"] == 2, counts
