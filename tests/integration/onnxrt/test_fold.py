"""The constant affine after a Conv is folded into it (qtune/adaptors/onnxrt/fold.py): same outputs, fewer
nodes, and nothing folded where the result would change (a second consumer, a graph output, a scale that is
not a constant of one value or one per channel)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qtune.adaptors.onnxrt.fold import fold_conv_affine

RNG = np.random.default_rng(0)


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value.astype(np.float32), name)


def _model() -> onnx.ModelProto:
    """x -> Conv a -> Mul(scalar) -> Add(per channel) -> Relu -> Conv b (no bias) -> Mul(per channel) -> Sigmoid
    -> Conv c -> Mul(by itself: not constant);  Conv d's output also read by the graph output (not folded)."""
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["a", "s_scalar"], ["a_s"], name="mul_a"),
        helper.make_node("Add", ["a_s", "t_channel"], ["a_t"], name="add_a"),
        helper.make_node("Relu", ["a_t"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "wb"], ["b"], name="conv_b"),
        helper.make_node("Mul", ["s_channel", "b"], ["b_s"], name="mul_b"),
        helper.make_node("Sigmoid", ["b_s"], ["g"], name="sigmoid"),
        helper.make_node("Conv", ["g", "wc", "bc"], ["c"], name="conv_c"),
        helper.make_node("Mul", ["c", "c"], ["c2"], name="mul_c"),
        helper.make_node("Conv", ["c2", "wd", "bd"], ["d"], name="conv_d"),
        helper.make_node("Mul", ["d", "s_scalar"], ["y"], name="mul_d"),
    ]
    initializers = [
        _const("wa", RNG.normal(size=(4, 3, 3, 3))), _const("ba", RNG.normal(size=4)),
        _const("s_scalar", np.array([0.7])), _const("t_channel", RNG.normal(size=(1, 4, 1, 1))),
        _const("wb", RNG.normal(size=(4, 4, 1, 1))), _const("s_channel", RNG.normal(size=(4, 1, 1))),
        _const("wc", RNG.normal(size=(4, 4, 3, 3))), _const("bc", RNG.normal(size=4)),
        _const("wd", RNG.normal(size=(2, 4, 1, 1))), _const("bd", RNG.normal(size=2)),
    ]
    graph = helper.make_graph(nodes, "fold", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2, 8, 8]),
                               helper.make_tensor_value_info("d", TensorProto.FLOAT, [2, 2, 8, 8])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _run(proto: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_folds_the_constant_affine_after_a_conv_and_keeps_the_function() -> None:
    proto = _model()
    x = RNG.normal(size=(2, 3, 8, 8)).astype(np.float32)
    before = _run(proto, x)

    assert fold_conv_affine(proto) == 2  # conv_a (scale and shift), conv_b (scale, no bias before)
    onnx.checker.check_model(proto)
    names = {node.name for node in proto.graph.node}
    assert not names & {"mul_a", "add_a", "mul_b"}
    assert {"mul_c", "mul_d", "relu", "sigmoid"} <= names, "a Mul of a non-constant or after a graph output stays"
    assert Counter(node.op_type for node in proto.graph.node)["Conv"] == 4
    after = _run(proto, x)
    for got, expected in zip(after, before, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert {"wa", "wb", "ba"}.isdisjoint(init.name for init in proto.graph.initializer), "old weights dropped"


def test_nothing_to_fold_changes_nothing() -> None:
    proto = _model()
    for node in proto.graph.node:  # every scale becomes a graph input: nothing is a constant
        if node.op_type == "Mul":
            node.input[1 if node.input[0] != "s_channel" else 0] = "x_scale"
    proto.graph.input.append(helper.make_tensor_value_info("x_scale", TensorProto.FLOAT, [1]))
    before = proto.SerializeToString()
    assert fold_conv_affine(proto) == 0
    assert proto.SerializeToString() == before


def test_a_scale_that_would_broadcast_past_a_1d_conv_output_is_not_folded() -> None:
    """A (1, 1, 1, 1) scale against a Conv1d's (N, C, L) output adds a dimension: folding it would change the
    result's shape."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="conv"),
             helper.make_node("Mul", ["a", "s"], ["y"], name="mul")]
    graph = helper.make_graph(nodes, "conv1d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [_const("w", RNG.normal(size=(1, 3, 1))), _const("s", np.array([[[[2.0]]]]))])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert fold_conv_affine(proto) == 0
    proto.graph.initializer[1].CopyFrom(_const("s", np.array([[2.0]])))  # (1, 1): one value, within (N, C, L)
    assert fold_conv_affine(proto) == 1
