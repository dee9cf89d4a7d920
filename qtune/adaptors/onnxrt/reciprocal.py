"""Division by a constant becomes multiplication by its reciprocal (`Div(x, c)` → `Mul(x, 1/c)`).

Why: ONNX Runtime has int8 kernels for Add and Mul (QLinearAdd, QLinearMul) and none for Div. A hard-swish
written out as `x · clip(x + 3, 0, 6) / 6` (PP-LCNet, MobileNetV3 exports) or a hard-sigmoid as
`clip(x + 3, 0, 6) / 6` therefore always leaves a DequantizeLinear, an fp32 Div and a QuantizeLinear
between two int8 Convs: on PP-OCRv4's recogniser 28 of them, and DequantizeLinear is serial in ORT's CPU
kernel (docs/speed.md). As a Mul the whole activation runs int8 between its Convs.

The function is the same up to float rounding (x · (1/c) and x / c differ in the last bit at most). Only
float constants with no zero, whose reciprocal is finite, are rewritten. Each Mul gets its own constant: a
constant shared by an int8 Mul and an fp32 one would be quantized for both (ONNX Runtime's quantizer shares it).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from qtune.adaptors.onnxrt.graph import GraphView

logger = logging.getLogger(__name__)


def _reciprocal(value: np.ndarray | None) -> np.ndarray | None:
    if value is None or not np.issubdtype(value.dtype, np.floating) or not np.all(np.isfinite(value)):
        return None
    if np.any(value == 0):
        return None
    with np.errstate(over="ignore", divide="ignore"):
        inverse = (1.0 / value.astype(np.float64)).astype(value.dtype)
    return inverse if np.all(np.isfinite(inverse)) else None


def divisions_as_multiplications(proto: onnx.ModelProto) -> int:
    """Rewrite every `Div` by a float constant as a `Mul` by its reciprocal, in place; returns how many."""
    view = GraphView(proto)
    taken = set(view.initializers) | set(view.producer)
    rewritten = 0
    for node in view.nodes:
        if node.op_type != "Div" or len(node.input) != 2 or node.domain not in ("", "ai.onnx"):
            continue
        inverse = _reciprocal(view.constant_array(node.input[1]))
        if inverse is None:
            continue
        name = f"{node.name or node.output[0]}_reciprocal"
        while name in taken:
            name += "_"
        taken.add(name)
        proto.graph.initializer.append(numpy_helper.from_array(inverse, name))
        node.op_type = "Mul"
        node.input[1] = name
        rewritten += 1
    if rewritten:
        logger.info("rewrote %d division(s) by a constant as multiplications by its reciprocal", rewritten)
    return rewritten
