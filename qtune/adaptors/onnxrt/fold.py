"""Fold a constant affine that follows a Conv (`Conv -> Mul(s) [-> Add(t)]`) into the Conv's weights and bias.

Why: ONNX Runtime folds such a scale at session start for fp32 only when it has the Conv's shape
(`ConvMulFusion` does not fire on a scalar scale, as in PP-LCNetV3's learnable affine blocks), and
never after quantization: a QDQ graph has `QLinearConv -> DequantizeLinear -> Mul -> Add` there, two
elementwise passes in fp32 and a serial DequantizeLinear (docs/speed.md) between the int8 Conv and
whatever follows. Folded, the Conv's output goes straight on. The result is the same function
(W' = W * s per output channel, b' = b * s + t), up to float rounding.

Only a scale and shift that are constants of one value or one value per output channel are folded,
and only when the Conv's (and the Mul's) output has no other consumer and is not a graph output.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from qtune.adaptors.onnxrt.graph import GraphView, all_node_inputs

logger = logging.getLogger(__name__)


def _per_channel(value: np.ndarray | None, channels: int, spatial: int) -> np.ndarray | None:
    """`value` as one float per output channel of a Conv's output (N, C, *`spatial` dims), when it broadcasts
    so: a single value, or C values shaped (C, 1, ...) or (1, C, 1, ...) with one 1 per spatial dim."""
    if value is None or not np.issubdtype(value.dtype, np.floating):
        return None
    if value.size == 1 and value.ndim <= spatial + 2:
        return np.full(channels, float(value.reshape(-1)[0]), dtype=np.float32)
    ones = (1,) * spatial
    if value.size == channels and value.shape in ((channels, *ones), (1, channels, *ones)):
        return value.reshape(channels).astype(np.float32)
    return None


def _only_consumer(view: GraphView, tensor: str, op_type: str) -> onnx.NodeProto | None:
    consumers = view.consumers.get(tensor, [])
    if len(consumers) == 1 and tensor not in view.graph_outputs and consumers[0].op_type == op_type:
        return consumers[0]
    return None


def _other_input(node: onnx.NodeProto, tensor: str) -> str:
    return node.input[1] if node.input[0] == tensor else node.input[0]


def _affine_after(view: GraphView, conv: onnx.NodeProto, channels: int, spatial: int
                  ) -> tuple[np.ndarray, np.ndarray, list[onnx.NodeProto]] | None:
    """(scale, shift, the nodes they come from) of the constant affine right after `conv`, if any."""
    mul = _only_consumer(view, conv.output[0], "Mul")
    if mul is None or len(mul.input) != 2:
        return None
    scale = _per_channel(view.constant_array(_other_input(mul, conv.output[0])), channels, spatial)
    if scale is None:
        return None
    add = _only_consumer(view, mul.output[0], "Add")
    shift = None
    if add is not None and len(add.input) == 2:
        shift = _per_channel(view.constant_array(_other_input(add, mul.output[0])), channels, spatial)
    if shift is None:
        return scale, np.zeros(channels, dtype=np.float32), [mul]
    return scale, shift, [mul, add]  # type: ignore[list-item]


def fold_conv_affine(proto: onnx.ModelProto) -> int:
    """Fold every constant `Mul [-> Add]` after a Conv into it, in place; returns how many Convs changed."""
    view = GraphView(proto)
    graph = proto.graph
    removed: set[str] = set()
    gone_tensors: set[str] = set()
    folded = 0
    for conv in view.nodes:
        if conv.op_type != "Conv" or len(conv.input) < 2:
            continue
        weight = view.constant_array(conv.input[1])
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        bias = view.constant_array(conv.input[2]) if has_bias else None
        if weight is None or weight.dtype != np.float32 or (has_bias and bias is None):
            continue
        channels = weight.shape[0]
        affine = _affine_after(view, conv, channels, weight.ndim - 2)
        if affine is None:
            continue
        scale, shift, nodes = affine
        base = bias.astype(np.float32) if bias is not None else np.zeros(channels, dtype=np.float32)
        new_weight = (weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))).astype(np.float32)
        new_bias = (base * scale + shift).astype(np.float32)
        weight_name, bias_name = f"{conv.name}_W_folded", f"{conv.name}_B_folded"
        graph.initializer.extend([numpy_helper.from_array(new_weight, weight_name),
                                  numpy_helper.from_array(new_bias, bias_name)])
        source = conv.input[0]
        del conv.input[:]
        conv.input.extend([source, weight_name, bias_name])
        gone_tensors.update([conv.output[0], *(node.output[0] for node in nodes[:-1])])
        conv.output[0] = nodes[-1].output[0]
        removed.update(node.name for node in nodes)
        folded += 1
    if folded:
        kept = [node for node in graph.node if node.name not in removed]
        del graph.node[:]
        graph.node.extend(kept)
        _drop_unused_initializers(graph)
        kept_info = [value for value in graph.value_info if value.name not in gone_tensors]
        del graph.value_info[:]
        graph.value_info.extend(kept_info)
        logger.info("folded the constant scale (and shift) after %d Conv(s) into their weights", folded)
    return folded


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in all_node_inputs(node)} | {value.name for value in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
