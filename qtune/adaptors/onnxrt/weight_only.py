"""Weight-only quantization (approach `weight_only`): MatMul weights in 4 or 8 bits per block, run by ONNX
Runtime's `MatMulNBits` contrib op, written by ORT's own code: algorithm `rtn` by `MatMulNBitsQuantizer`'s
DEFAULT path (round to nearest with MLAS's C++ block quantizer), `k_quant` and `gptq` by the Neural Compressor
code ORT vendors (`weight_only_algorithms.py`: what each writes, and what it ignores).

How a tune config maps onto ORT:
- the weight's TensorConfig: dtype int4/int8 → `bits` 4/8, granularity `per_block_<n>` → `block_size` n,
  scheme sym → `is_symmetric` (k_quant is asymmetric whatever the scheme), algorithm rtn / k_quant / gptq
  (gptq at int4 only: `ALGORITHM_DTYPES`; it runs on the job's calibration data; HQQ is not offered: it needs
  torch); an embedding Gather: rtn only (ORT's other algorithms know MatMul only);
- the activation's dtype: int8 → `accuracy_level` 4 (MLAS quantizes the activations per block to int8
  at run time and uses its int8 kernels: the fast path on CPU), fp32 → `accuracy_level` 0 (fp32 compute);
- an op in fp32 → `nodes_to_exclude`.
ORT's quantizer takes one setting per call: its per-node `customized_weight_config` only reaches the
Neural Compressor path, not the C++ DEFAULT one. So ops are grouped by setting (algorithm included) and each
group is one pass over the model with every other node excluded; an op rewritten by an earlier pass is a
MatMulNBits by then, so passes never touch each other's ops. GPTQ passes run last: the Hessian of a layer is
measured on the inputs the quantized model feeds it (the other passes' layers already quantized).

A Gemm with a constant B (no transA, alpha = beta = 1) is first rewritten as MatMul (+ Add) under its own
name (ORT's quantizer only knows MatMul; ORT's basic optimisation turns 2-D MatMul + Add into Gemm).

An embedding (a Gather from a constant 2-D float table along axis 0) becomes ORT's `GatherBlockQuantized`,
blocks along the embedding width: 4 bits only (ORT's quantizer refuses 8 for Gather), and no int8 compute
(there is none to do), so its capability offers weight int4 or fp32 and activation fp32. It buys size rather
than time: a 32,000 × 2,048 table is 262 MB in fp32 and about 37 MB in 4 bits with its scales.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qtune.adaptors.onnxrt.capability import gemm_unfoldable
from qtune.adaptors.onnxrt.graph import GraphView, _attr
from qtune.adaptors.onnxrt.model import OnnxModel, save_model
from qtune.adaptors.onnxrt.quantize import QuantPlan, _excluded_because
from qtune.adaptors.onnxrt.weight_only_algorithms import Feeds, gptq_pass, k_quant_pass
from qtune.tuning.config import OpConfig, TuneConfig

logger = logging.getLogger(__name__)

APPROACH = "weight_only"
WEIGHT_DTYPES = ["int4", "int8", "fp32"]
BITS = {"int4": 4, "int8": 8}
OFFERED_BLOCKS = (32, 128)
"""Block sizes offered by default (ORT GenAI's CPU default first); a constraint may name others."""
MIN_K = 16
ALGORITHMS = ("rtn", "k_quant", "gptq")
"""Offered for MatMul (and unfoldable Gemm) weights, the default first; the pass order too."""
ALGORITHM_DTYPES = {"gptq": ["int4"]}
"""Algorithm → the only weight dtypes it writes MatMulNBits for (absent: every dtype offered)."""
ACCURACY_LEVEL = {"int8": 4, "fp32": 0}
GATHER_WEIGHT_DTYPES = ["int4", "fp32"]
WEIGHT_OPS = ("MatMul", "Gemm", "Gather")


def block_size(granularity: str | None) -> int:
    """`per_block_<n>` → n."""
    if not granularity or not granularity.startswith("per_block_"):
        raise ValueError(f"weight-only granularity must be per_block_<n>, got {granularity!r}")
    return int(granularity.rsplit("_", 1)[1])


def ineligible(node: onnx.NodeProto, view: GraphView) -> str | None:
    """Why MatMulNBits cannot take this op's weight; None when it can."""
    if node.op_type == "Gemm":
        if not gemm_unfoldable(node, view):
            return "a Gemm is taken only with a constant B, no transA and alpha = beta = 1"
        weight = view.initializers[node.input[1]]
        k = weight.dims[1] if _attr(node, "transB", 0) else weight.dims[0]
    elif node.op_type == "Gather":
        if not node.input or node.input[0] not in view.initializers:
            return "no constant table (input data is not an initializer)"
        weight = view.initializers[node.input[0]]
        if len(weight.dims) != 2 or _attr(node, "axis", 0) != 0:
            return "only a 2-D table gathered along axis 0 (an embedding) has a block-quantized Gather"
        k = weight.dims[1]
    elif node.op_type == "MatMul":
        if len(node.input) < 2 or node.input[1] not in view.initializers:
            return "no constant weight (input B is not an initializer)"
        weight = view.initializers[node.input[1]]
        if len(weight.dims) < 2 or any(d != 1 for d in weight.dims[:-2]):
            return f"weight of shape {list(weight.dims)} is not 2-D"
        k = weight.dims[-2]
    else:
        return f"{node.op_type} has no weight-only kernel"
    if weight.data_type != onnx.TensorProto.FLOAT:
        return "weight is not float32"
    if k < MIN_K:
        return f"K = {k} < {MIN_K}: too small for blocks"
    return None


def _entry(k: int, forced_reason: str | None, gather: bool = False) -> dict[str, Any]:
    if forced_reason is not None:
        return {"activation": {"dtype": ["fp32"]}, "weight": {"dtype": ["fp32"]}, "approach": [APPROACH]}
    blocks = [b for b in OFFERED_BLOCKS if b <= k] or [MIN_K]
    return {"activation": {"dtype": ["fp32"] if gather else ["int8", "fp32"]},
            "weight": {"dtype": list(GATHER_WEIGHT_DTYPES if gather else WEIGHT_DTYPES), "scheme": ["sym", "asym"],
                       "granularity": [f"per_block_{b}" for b in blocks],
                       "algorithm": ["rtn"] if gather else list(ALGORITHMS)},
            "approach": [APPROACH], **({} if gather else {"algorithm_dtypes": dict(ALGORITHM_DTYPES)})}


def _k_of(node: onnx.NodeProto, view: GraphView) -> int:
    if node.op_type == "Gather":
        return int(view.initializers[node.input[0]].dims[1])
    weight = view.initializers[node.input[1]]
    if node.op_type == "Gemm" and _attr(node, "transB", 0):
        return int(weight.dims[1])
    return int(weight.dims[-2])


def weight_only_capability(view: GraphView, forced_fp32: dict[str, str],
                           model_notes: dict[str, str]) -> dict[str, Any]:
    """The capability of a weight-only job: every MatMul (or unfoldable Gemm) with a constant float
    weight, and every embedding Gather. Activation dtype int8/fp32 is the MatMulNBits compute type
    (accuracy_level 4/0)."""
    notes = dict(model_notes)
    opwise: dict[tuple[str, str], dict[str, Any]] = {}
    optypewise: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for node in view.nodes:
        if node.op_type not in WEIGHT_OPS:
            continue
        why = ineligible(node, view)
        if why is not None:
            notes[node.name] = f"weight_only: {why}; stays fp32"
            continue
        forced = forced_fp32.get(node.name)
        if forced is not None:
            notes[node.name] = forced
        entry = _entry(_k_of(node, view), forced, gather=node.op_type == "Gather")
        opwise[(node.name, node.op_type)] = entry
        order.append(node.name)
        if forced is None:
            optypewise.setdefault(node.op_type, entry)
    for name, note in notes.items():
        logger.info("capability note %s: %s", name, note)
    return {"optypewise": optypewise, "opwise": opwise, "graph_order": order, "notes": notes, "fused_groups": []}


def plan_weight_only(view: GraphView, cfg: TuneConfig, quantizable: dict[str, dict[str, Any]],
                     forced_fp32: dict[str, str]) -> QuantPlan:
    quantized: dict[str, OpConfig] = {}
    excluded: dict[str, str] = {}
    for node in view.nodes:
        if node.name not in quantizable:
            continue
        op_cfg = cfg.ops.get(node.name)
        reason = _excluded_because(node, op_cfg, quantizable[node.name], forced_fp32, APPROACH)
        if reason is None and (op_cfg.weight is None or op_cfg.weight.is_fp32):
            reason = "weight fp32 in the tune config"
        if reason is not None:
            excluded[node.name] = reason
        else:
            quantized[node.name] = op_cfg
    return QuantPlan(APPROACH, "QOperator", quantized, excluded)


Setting = tuple[str, int, int, bool, int]
"""(algorithm, bits, block size, symmetric, accuracy_level): one quantizer pass."""


def setting(op_cfg: OpConfig) -> Setting:
    """The pass of a quantized op. k_quant is asymmetric whatever the scheme (it always writes zero points)."""
    weight = op_cfg.weight
    assert weight is not None
    algorithm = weight.algorithm or "rtn"
    if algorithm not in ALGORITHMS:
        raise ValueError(f"weight-only algorithm {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    if weight.dtype not in ALGORITHM_DTYPES.get(algorithm, [weight.dtype]):
        raise ValueError(f"weight-only algorithm {algorithm} takes weight dtype {ALGORITHM_DTYPES[algorithm]}, "
                         f"not {weight.dtype}")
    symmetric = weight.scheme == "sym" and algorithm != "k_quant"
    return (algorithm, BITS[weight.dtype], block_size(weight.granularity), symmetric,
            ACCURACY_LEVEL.get(op_cfg.activation.dtype, 0))


def setting_label(key: Setting) -> str:
    """How a pass is named in the record (meta.json weight_only_passes), e.g. gptq-bits4-block32-sym-level4;
    round to nearest keeps its old label (no algorithm prefix)."""
    algorithm, bits, block, symmetric, level = key
    label = f"bits{bits}-block{block}-{'sym' if symmetric else 'asym'}-level{level}"
    return label if algorithm == "rtn" else f"{algorithm}-{label}"


def _pass_order(key: Setting) -> tuple[int, Setting]:
    return ALGORITHMS.index(key[0]), key


def unfold_gemms(proto: onnx.ModelProto, names: set[str]) -> int:
    """Rewrite the named Gemm nodes as MatMul (named as the Gemm) + Add (`<name>_bias`); B is transposed
    when transB is set. Returns how many were rewritten."""
    graph = proto.graph
    initializers = {init.name: init for init in graph.initializer}
    new_nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        if node.op_type != "Gemm" or node.name not in names:
            new_nodes.append(node)
            continue
        weight_name = node.input[1]
        if _attr(node, "transB", 0):
            array = numpy_helper.to_array(initializers[weight_name]).T
            weight_name = f"{weight_name}_T_{node.name}"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), weight_name))
        has_bias = len(node.input) > 2 and bool(node.input[2])
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], weight_name], [product], name=node.name))
        if has_bias:
            new_nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                              name=f"{node.name}_bias"))
        count += 1
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    return count


def _at_opset_21(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` converted to opset 21 when it is older. ORT's quantizer stamps opset 21 on a model whose Gather it
    quantizes (int4 tensors need it) without converting the other nodes, so an op whose schema changed since the
    model's opset (e.g. ReduceMean's `axes`, an attribute before opset 18) made the result fail to load. The
    converter does what the stamp leaves out; where it cannot, the stamp alone remains, as before."""
    version = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 21)
    if version >= 21:
        return proto
    from onnx import version_converter

    try:
        return version_converter.convert_version(proto, 21)
    except Exception as exc:  # noqa: BLE001 - the converter raises several kinds; the stamp alone remains
        logger.warning("weight-only: could not convert the model from opset %d to 21 (%s); ORT's quantizer stamps "
                       "21 on it as is", version, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        return proto


def _rtn_pass(proto: onnx.ModelProto, names: list[str], all_names: set[str], gathers: set[str],
              key: Setting) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    _, bits, block, symmetric, level = key
    op_types = ("MatMul", "Gather") if gathers & set(names) else ("MatMul",)
    quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=block, is_symmetric=symmetric,
                                     accuracy_level=level or None, nodes_to_exclude=sorted(all_names - set(names)),
                                     op_types_to_quantize=op_types, quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer.process()
    return quantizer.model.model


def quantize_proto(proto: onnx.ModelProto, view: GraphView, plan: QuantPlan,
                   feeds: Feeds | None = None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """`proto` (edited in place) with the plan's ops as MatMulNBits: one pass per setting. `feeds`: the
    calibration data, for gptq. Returns the model and {setting label: op names} for the record."""
    gemms = {name for name in plan.quantized if view.by_name[name].op_type == "Gemm"}
    if gemms:
        unfold_gemms(proto, gemms)
    groups: dict[Setting, list[str]] = {}
    for name, op_cfg in plan.quantized.items():
        groups.setdefault(setting(op_cfg), []).append(name)
    gathers = {name for name in plan.quantized if view.by_name[name].op_type == "Gather"}
    if gathers:
        proto = _at_opset_21(proto)
    all_names = {node.name for node in proto.graph.node}
    order = sorted(groups, key=_pass_order)
    for key in order:
        names = sorted(groups[key])
        algorithm, bits, block, symmetric, level = key
        started = time.perf_counter()
        if algorithm == "k_quant":
            proto = k_quant_pass(proto, names, bits, block, level)
        elif algorithm == "gptq":
            proto = gptq_pass(proto, names, bits, block, symmetric, level, feeds)
        else:
            proto = _rtn_pass(proto, names, all_names, gathers, key)
        logger.debug("weight-only pass %s (%d ops) took %.2fs", setting_label(key), len(names),
                     time.perf_counter() - started)
    return proto, {setting_label(key): sorted(groups[key]) for key in order}


def uses_calibration(cfg: TuneConfig) -> bool:
    """The config has an op quantized by an algorithm that reads the calibration data (gptq)."""
    return any(op.weight is not None and not op.weight.is_fp32 and op.weight.algorithm == "gptq"
               for op in cfg.ops.values())


def run_weight_only(source: OnnxModel, view: GraphView, plan: QuantPlan, output: Path,
                    feeds: Feeds | None = None) -> dict[str, Any]:
    """The plan applied to the source model, saved to `output`; returns {setting label: op names}."""
    started = time.perf_counter()
    proto, groups = quantize_proto(source.load(), view, plan, feeds)
    logger.debug("MatMulNBits quantization took %.2fs", time.perf_counter() - started)
    save_model(proto, output, external=bool(source.external_data_files()) or None)
    return groups
