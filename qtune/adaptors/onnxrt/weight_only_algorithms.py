"""Weight-only algorithms besides round to nearest: k-quant and GPTQ, from the code ONNX Runtime ships.

ONNX Runtime vendors Intel Neural Compressor's weight-only code (`onnxruntime.quantization.neural_compressor`);
the neural-compressor package is not needed, and the code runs under numpy 2. `MatMulNBitsQuantizer` reaches
it through `KQuantWeightOnlyQuantConfig` / `GPTQWeightOnlyQuantConfig`, but (ORT 1.32) its GPTQ path ignores
`nodes_to_exclude` and forces 4 bits on every MatMul, its 4-bit zero-point packer pairs points across rows
(a ValueError whenever K / block is odd, e.g. K = 384 in blocks of 128), and its GPTQ rounds the GPTQ
weights again onto a grid of max|Q|·2/15 instead of the one GPTQ used (a half-step error on every weight:
on a plain layer of the digits MLP, 7x the output error of round to nearest). So qtune runs the vendored
algorithms (`quant_tensor_k_quant_cpu`, `gptq`) and node builder (`make_matmul_weight_only_node`) in its
own loop over the pass's MatMuls, packs zero points per row, and writes GPTQ's own grid.

What each writes: a `MatMulNBits` node named `<op>_Q<bits>` (as ORT's DEFAULT path) with `K`, `N`, `bits`,
`block_size` = the config's block and `accuracy_level` when > 0 (the same semantics: 4 = int8 compute).
Differences from round to nearest, which the tune config cannot express otherwise:
- k-quant (llama.cpp's search for the scale and minimum that minimise the weighted block error) always writes
  zero points: asymmetric whatever the scheme (asym MatMulNBits is a little slower on CPU); 4 or 8 bits.
- GPTQ (the weights corrected column by column with the inverse Hessian of the layer's inputs on the
  calibration data) at 4 bits only: at 8 bits ORT's code leaves a fake-quantized fp32 MatMul, so the
  capability pairs gptq with int4 (`ALGORITHM_DTYPES`). Its own column block (`blocksize`, the lazy-batch
  width of the algorithm) is ORT's default 128, whatever the quantization block. The Hessians take one run of
  the model per calibration batch (the batches are views of the calibration set, nothing is copied) and hold
  a K x K float64 matrix per distinct layer input.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx

logger = logging.getLogger(__name__)

Feeds = Callable[[], Iterable[dict[str, np.ndarray]]]
"""A fresh iterable of model feeds (batches of the calibration data) per call."""
GPTQ_OPTIONS = {"percdamp": 0.01, "blocksize": 128, "actorder": False, "mse": False, "perchannel": True}
"""ORT's GPTQWeightOnlyQuantConfig defaults."""
NodeBuilder = Callable[[onnx.NodeProto, np.ndarray], tuple[onnx.NodeProto, list[onnx.TensorProto]]]
"""(MatMul, its weight [K, N]) → (MatMulNBits, its initializers)."""


def _packed_zero_points(zero_points: np.ndarray, n: int, k_blocks: int, bits: int) -> np.ndarray:
    """MatMulNBits' zero points: uint8 [N, ceil(k_blocks * bits / 8)], two 4-bit points a byte, low nibble first,
    each row padded with the default point 8. (The vendored packer pairs points across rows, which breaks, and
    raises, when k_blocks is odd: K = 384 in blocks of 128, say.)"""
    points = np.asarray(zero_points, dtype=np.uint8).reshape(n, k_blocks)
    if bits == 8:
        return points
    if k_blocks % 2:
        points = np.concatenate([points, np.full((n, 1), 8, np.uint8)], axis=1)
    return (points[:, 0::2] | (points[:, 1::2] << 4)).astype(np.uint8)


def _matmulnbits(node: onnx.NodeProto, weight: np.ndarray, bits: int, block: int, level: int, codes: np.ndarray,
                 scales: np.ndarray, zero_points: np.ndarray | None) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """The MatMulNBits of `node` from per-block codes/scales/zero points [N · k_blocks, ...] (block along K)."""
    from onnxruntime.quantization.neural_compressor.weight_only import make_matmul_weight_only_node

    k_blocks = (weight.shape[0] - 1) // block + 1
    new_node, inits = make_matmul_weight_only_node(node, weight.shape, bits, block, k_blocks, codes.astype("uint8"),
                                                   scales.astype(weight.dtype), None, accuracy_level=level)
    if zero_points is not None:
        packed = _packed_zero_points(zero_points, weight.shape[1], k_blocks, bits)
        inits.append(onnx.numpy_helper.from_array(packed, node.input[1] + "_zp"))
        new_node.input.append(inits[-1].name)
    return new_node, inits


def _replace_matmuls(proto: onnx.ModelProto, names: list[str], build: NodeBuilder) -> onnx.ModelProto:
    """`proto` with the named MatMuls (constant weight) replaced by what `build` makes of them; a weight no other
    node reads is dropped."""
    wanted = set(names)
    initializers = {init.name: init for init in proto.graph.initializer}
    users: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    nodes: list[onnx.NodeProto] = []
    for node in proto.graph.node:
        if node.name not in wanted or node.op_type != "MatMul" or node.input[1] not in initializers:
            nodes.append(node)
            continue
        new_node, inits = build(node, onnx.numpy_helper.to_array(initializers[node.input[1]]))
        nodes.append(new_node)
        proto.graph.initializer.extend(inits)
        if users[node.input[1]] == 1:
            proto.graph.initializer.remove(initializers[node.input[1]])
    proto.graph.ClearField("node")
    proto.graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):  # the vendored code leaves it out
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return proto


def k_quant_pass(proto: onnx.ModelProto, names: list[str], bits: int, block: int, level: int) -> onnx.ModelProto:
    """The named MatMuls as MatMulNBits quantized by k-quant (asymmetric, see the module docstring)."""
    from onnxruntime.quantization.neural_compressor.weight_only import pad_tensor, quant_tensor_k_quant_cpu

    def build(node: onnx.NodeProto, weight: np.ndarray) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
        k_blocks = (weight.shape[0] - 1) // block + 1
        with np.errstate(divide="ignore", invalid="ignore"):  # a constant block's search step divides 0 by 0: loses
            codes, scales, zero_points = quant_tensor_k_quant_cpu(pad_tensor(weight, block, k_blocks).T, bits, block)
        return _matmulnbits(node, weight, bits, block, level, codes, scales, zero_points)

    return _replace_matmuls(proto, names, build)


def _hessians(proto: onnx.ModelProto, inputs: list[str], feeds: Feeds) -> dict[str, np.ndarray]:
    """{MatMul input: 2 X^T X / rows} over the calibration data, X the input's rows (tokens): one run per batch
    with every wanted input as an extra output (the vendored code runs the model once per input and batch)."""
    import onnxruntime as ort

    augmented = onnx.ModelProto()
    augmented.CopyFrom(proto)
    del augmented.graph.output[:]
    augmented.graph.output.extend([onnx.helper.make_empty_tensor_value_info(name) for name in inputs])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(augmented.SerializeToString(), options, providers=["CPUExecutionProvider"])
    sums: dict[str, np.ndarray] = {}
    rows = 0
    for feed in feeds():
        outputs = session.run(inputs, feed)
        for name, value in zip(inputs, outputs, strict=True):
            x = np.asarray(value, dtype=np.float64).reshape(-1, value.shape[-1])
            sums[name] = sums.get(name, 0.0) + x.T @ x
        rows += int(np.prod(outputs[0].shape[:-1]))
    if rows == 0:
        raise ValueError("weight-only algorithm gptq: the calibration data yielded no samples")
    return {name: 2.0 * total / rows for name, total in sums.items()}


def _on_grid(fake: np.ndarray, bits: int, block: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray,
                                                                                   np.ndarray | None]:
    """(codes, scales, zero points) of GPTQ's fake-quantized weight [K, N] per block along K: the grid GPTQ used,
    recovered from its values (sym: levels (q - 8)·s, s from the extreme level; asym: min/max of the block), so
    the codes are exact. (The vendored code rounds them again onto a grid of max|Q|·2/15: a ~half-step error.)"""
    from onnxruntime.quantization.neural_compressor.weight_only import pad_tensor, quant_tensor

    k_blocks = (fake.shape[0] - 1) // block + 1
    groups = pad_tensor(fake, block, k_blocks).T.reshape(-1, block)
    if not symmetric:
        codes, scales, zero_points = quant_tensor(groups, bits, block, "asym", "uint")
        return codes, scales, zero_points
    half = 2 ** (bits - 1)
    scales = np.maximum(-groups.min(axis=1, keepdims=True) / half, groups.max(axis=1, keepdims=True) / (half - 1))
    scales[scales == 0] = 1.0
    codes = np.clip(np.round(groups / scales) + half, 0, 2 * half - 1)
    return codes, scales, None


def gptq_pass(proto: onnx.ModelProto, names: list[str], bits: int, block: int, symmetric: bool, level: int,
              feeds: Feeds | None) -> onnx.ModelProto:
    """The named MatMuls as 4-bit MatMulNBits quantized by GPTQ (the vendored `gptq`) with the Hessians of their
    inputs on the calibration data `feeds`."""
    from onnxruntime.quantization.neural_compressor.weight_only import gptq

    if bits != 4:
        raise ValueError(f"weight-only algorithm gptq writes MatMulNBits at 4 bits only, not {bits} (ops {names})")
    if feeds is None:
        raise ValueError(f"weight-only algorithm gptq needs calibration data (ops {names})")
    weights = {init.name for init in proto.graph.initializer}
    inputs = sorted({node.input[0] for node in proto.graph.node
                     if node.name in set(names) and node.op_type == "MatMul" and node.input[1] in weights})
    hessians = _hessians(proto, inputs, feeds)
    options: dict[str, Any] = dict(GPTQ_OPTIONS)

    def build(node: onnx.NodeProto, weight: np.ndarray) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
        fake = gptq(weight.astype(np.float64), hessians[node.input[0]].copy(), num_bits=bits, group_size=block,
                    scheme="sym" if symmetric else "asym", **options)
        return _matmulnbits(node, weight, bits, block, level, *_on_grid(fake, bits, block, symmetric))

    return _replace_matmuls(proto, names, build)
