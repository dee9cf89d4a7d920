"""What ONNX Runtime can quantize in a given (pre-optimised) graph, per op type and per op.

Only ops that ORT's quantization registry (`onnxruntime.quantization.registry`) knows are listed:
static QDQ: the QDQ and QLinear op sets; static QOperator: the QLinear set; dynamic: the
IntegerOps set (MatMul with a constant B, Attention, LSTM, Gather/EmbedLayerNormalization of
constant tables) plus Gemm with a constant B, which ORT's dynamic quantizer rewrites as
`<name>_MatMul` + `<name>_Add`. Conv is deliberately static-only: dynamic ConvInteger is 2.5–7×
slower than fp32 on CPU and ruins accuracy.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx

from qtune.adaptors.onnxrt.chains import chain_node_types, light_chains
from qtune.adaptors.onnxrt.graph import GraphView, _attr, weight_inputs

logger = logging.getLogger(__name__)

ABSURD_RANGE = 1e9
"""|value| at or above this in a calibration range or a constant is treated like infinity: BERT-style
attention masks carry -inf or the float minimum, which makes an int8 scale useless."""

# Ops whose output keeps an absurd input value absurd (used to follow a mask constant statically).
_PROPAGATING_OPS = {
    "Add", "Sub", "Mul", "Div", "Where", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Cast",
    "Transpose", "Concat", "Slice", "Gather", "Identity", "Neg", "Tile", "Min", "Max",
}

ACT_ALGORITHMS = ["minmax", "kl", "percentile"]
ORT_ALGORITHM_NAMES = {"minmax": "MinMax", "kl": "Entropy", "percentile": "Percentile"}

_DYNAMIC_ONLY = {"Attention", "LSTM", "EmbedLayerNormalization"}

FUSION_PATTERNS: list[list[str]] = [
    ["Conv", "Relu"],
    ["Conv", "Clip"],
    ["Conv", "LeakyRelu"],
    ["Conv", "Add"],
    ["Conv", "Add", "Relu"],
    ["Conv", "BatchNormalization"],
    ["Gemm", "Relu"],
    ["Gemm", "Clip"],
    ["MatMul", "Add"],
    ["MatMul", "Add", "Relu"],
    ["MatMul", "Add", "Gelu"],
    ["MatMul", "Add", "FastGelu"],
    ["MatMul", "Relu"],
    ["Add", "Relu"],
    ["MatMul", "Add", "Add", "LayerNormalization"],
]


def registries() -> tuple[set[str], set[str], set[str]]:
    from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry, QLinearOpsRegistry

    qdq = set(QDQRegistry) | set(QLinearOpsRegistry)
    qoperator = set(QLinearOpsRegistry)
    dynamic = set(IntegerOpsRegistry)
    return qdq, qoperator, dynamic


def _dynamic_eligible(node: onnx.NodeProto, view: GraphView, dynamic_types: set[str]) -> bool:
    op = node.op_type
    if op in ("Conv", "Transpose"):
        return False
    if op == "Gemm":
        return gemm_unfoldable(node, view)
    if op not in dynamic_types:
        return False
    if op == "MatMul":
        return len(node.input) > 1 and node.input[1] in view.initializers
    if op == "Gather":
        return node.input[0] in view.initializers and view.is_float(node.input[0])
    if op in ("Attention", "LSTM"):
        return bool(weight_inputs(node, view))
    return True


def gemm_unfoldable(node: onnx.NodeProto, view: GraphView) -> bool:
    """A Gemm ORT's dynamic quantizer rewrites as MatMul (+ Add): constant B, no transA, alpha = beta = 1."""
    if node.op_type != "Gemm" or len(node.input) < 2 or node.input[1] not in view.initializers:
        return False
    if _attr(node, "transA", 0) or float(_attr(node, "alpha", 1.0)) != 1.0:
        return False
    if len(node.input) > 2 and node.input[2] and float(_attr(node, "beta", 1.0)) != 1.0:
        return False
    return True


def static_non_finite_tensors(view: GraphView) -> dict[str, str]:
    """Tensors that will carry non-finite or absurd values, found from constants alone (an attention
    mask constant and what it flows into through element-wise and shape ops)."""
    bad: dict[str, str] = {}
    for name in sorted(view.constants):
        array = view.constant_array(name)
        if array is None or array.dtype.kind != "f" or array.size == 0:
            continue
        finite = np.isfinite(array)
        if not finite.all():
            bad[name] = "constant contains non-finite values (-inf/inf/nan), e.g. an attention mask"
        elif float(np.abs(array).max()) >= ABSURD_RANGE:
            bad[name] = f"constant contains absurd values (|x| up to {float(np.abs(array).max()):.3g})"
    frontier = list(bad)
    while frontier:
        tensor = frontier.pop()
        for consumer in view.consumers.get(tensor, []):
            if consumer.op_type not in _PROPAGATING_OPS:
                continue
            for output in consumer.output:
                if output and output not in bad and view.is_float(output):
                    bad[output] = f"computed from {tensor} ({bad[tensor].split(' (')[0]})"
                    frontier.append(output)
    return bad


def range_problem(low: float, high: float) -> str | None:
    """Why a calibration range cannot be quantized, or None."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return f"non-finite calibration range [{low:.3g}, {high:.3g}]"
    if max(abs(low), abs(high)) >= ABSURD_RANGE:
        return f"absurd calibration range [{low:.3g}, {high:.3g}]"
    return None


def ops_touching(view: GraphView, tensors: dict[str, str], quantizable: set[str]) -> dict[str, str]:
    """Quantizable ops that consume or produce one of `tensors` → reason (first tensor found)."""
    reasons: dict[str, str] = {}
    for tensor, why in tensors.items():
        touching = list(view.consumers.get(tensor, []))
        if tensor in view.producer:
            touching.append(view.producer[tensor])
        for node in touching:
            if node.name in quantizable and node.name not in reasons:
                reasons[node.name] = f"tensor {tensor!r}: {why}; kept fp32"
    return reasons


def _relevant(approach: str, *approaches: str) -> bool:
    """Whether a note about `approaches` concerns a job of `approach` (static, dynamic or auto)."""
    return approach not in ("static", "dynamic") or approach in approaches


def _activation_capability(static_ok: bool, quant_format: str, approach: str) -> tuple[dict[str, Any], list[str]]:
    """An op's activation choices, and the notes that explain them."""
    notes: list[str] = []
    if static_ok:
        act_dtypes = ["uint8", "fp32"] if quant_format == "QOperator" else ["uint8", "int8", "fp32"]
        activation = {"dtype": act_dtypes, "scheme": ["asym", "sym"], "granularity": ["per_tensor"],
                      "algorithm": list(ACT_ALGORITHMS), "reduce_range": [False, True]}
        if quant_format == "QOperator" and _relevant(approach, "static"):
            notes.append("QOperator format: activations uint8 only (int8 activations need QDQ on x86)")
    else:
        activation = {"dtype": ["uint8", "fp32"], "scheme": ["asym"], "granularity": ["per_tensor"],
                      "algorithm": ["minmax"], "reduce_range": [False]}
        if approach == "auto":
            notes.append("dynamic only: ORT quantizes this op with its IntegerOps (run-time activation ranges)")
    return activation, notes


def _op_capability(node: onnx.NodeProto, view: GraphView, static_ok: bool, dynamic_ok: bool, quant_format: str,
                   per_channel_ok: bool, approach: str, forced_reason: str | None) -> tuple[dict[str, Any], list[str]]:
    """One quantizable op's capability entry (activation, weight, approaches) and its notes, in order."""
    approaches = (["static"] if static_ok else []) + (["dynamic"] if dynamic_ok else [])
    weights = weight_inputs(node, view)
    activation, op_notes = _activation_capability(static_ok, quant_format, approach)
    if node.op_type == "Conv" and _relevant(approach, "dynamic"):
        op_notes.append("static only: dynamic ConvInteger is 2.5-7x slower than fp32 on CPU and hurts accuracy")
    if node.op_type == "Gemm" and dynamic_ok and _relevant(approach, "dynamic"):
        op_notes.append(f"dynamic: ORT rewrites it as {node.name}_MatMul (MatMulInteger) + {node.name}_Add")
    entry: dict[str, Any] = {"activation": activation, "approach": approaches}
    if weights:
        granularity = ["per_channel", "per_tensor"] if per_channel_ok else ["per_tensor"]
        if not per_channel_ok:
            op_notes.append("per_tensor weights only: per-channel QDQ needs opset >= 13")
        entry["weight"] = {"dtype": ["int8", "uint8", "fp32"], "scheme": ["sym", "asym"],
                           "granularity": granularity, "algorithm": ["minmax"],
                           "reduce_range": [False, True]}
    if forced_reason is not None:
        entry["activation"] = {"dtype": ["fp32"]}
        if weights:
            entry["weight"] = {"dtype": ["fp32"]}
        op_notes.append(forced_reason)
    return entry, op_notes


def build_capability(
    view: GraphView,
    quant_format: str = "QDQ",
    per_channel_ok: bool = True,
    forced_fp32: dict[str, str] | None = None,
    model_notes: dict[str, str] | None = None,
    approach: str = "auto",
) -> dict[str, Any]:
    """The LPOT-shaped capability of an optimised graph (see qtune.adaptors.base).

    `approach` is the job's (static, dynamic or auto): notes about the other approach are left out,
    so a static job is not told 38 times why dynamic ConvInteger is avoided."""
    qdq_types, qoperator_types, dynamic_types = registries()
    static_types = qoperator_types if quant_format == "QOperator" else qdq_types
    forced_fp32 = dict(forced_fp32 or {})
    notes: dict[str, str] = dict(model_notes or {})
    opwise: dict[tuple[str, str], dict[str, Any]] = {}
    optypewise: dict[str, dict[str, Any]] = {}
    graph_order: list[str] = []
    static_names: list[str] = []

    for node in view.nodes:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Cast"):
            continue
        static_ok = node.op_type in static_types and node.op_type not in _DYNAMIC_ONLY
        dynamic_ok = _dynamic_eligible(node, view, dynamic_types)
        has_float_io = any(view.is_float(name) for name in [*node.input, *node.output] if name)
        if not (static_ok or dynamic_ok) or not has_float_io:
            continue
        entry, op_notes = _op_capability(node, view, static_ok, dynamic_ok, quant_format, per_channel_ok, approach,
                                         forced_fp32.get(node.name))
        if op_notes:
            notes[node.name] = "; ".join(op_notes)
        opwise[(node.name, node.op_type)] = entry
        graph_order.append(node.name)
        if static_ok and node.name not in forced_fp32:
            static_names.append(node.name)
        if node.op_type not in optypewise and node.name not in forced_fp32:
            optypewise[node.op_type] = {key: (dict(value) if isinstance(value, dict) else list(value))
                                        for key, value in entry.items()}
    for name, note in notes.items():
        logger.info("capability note %s: %s", name, note)
    chains = light_chains(view, static_names)
    if chains:
        logger.info("%d light int8 chain(s) between compute ops: %s", len(chains), chain_node_types(view, chains))
    return {"optypewise": optypewise, "opwise": opwise, "graph_order": graph_order, "notes": notes,
            "fused_groups": fused_groups(view), "light_chains": chains, "smooth_quant": True}
    # smooth_quant: static configs may carry a SmoothQuant alpha (TuneConfig.extras, see smooth_quant.py)


def fused_patterns(view: GraphView) -> list[list[str]]:
    """FUSION_PATTERNS present in the graph as chains of single-consumer producer→consumer edges."""
    found: list[list[str]] = []
    for pattern in FUSION_PATTERNS:
        for node in view.nodes:
            if node.op_type == pattern[0] and _chain_matches(view, node, pattern[1:]):
                found.append(list(pattern))
                break
    return found


def fused_groups(view: GraphView) -> list[list[str]]:
    """The FUSION_PATTERNS instances of the graph by op NAME (longest pattern first, each op in one
    group at most): what ORT runs as one kernel, so the tuner keeps each group in one precision."""
    patterns = sorted(FUSION_PATTERNS, key=len, reverse=True)
    taken: set[str] = set()
    groups: list[list[str]] = []
    for node in view.nodes:
        if node.name in taken:
            continue
        for pattern in patterns:
            if node.op_type != pattern[0]:
                continue
            chain = _chain(view, node, pattern[1:])
            if chain is not None and not taken.intersection(n.name for n in chain):
                groups.append([n.name for n in chain])
                taken.update(n.name for n in chain)
                break
    return groups


def _chain(view: GraphView, node: onnx.NodeProto, rest: list[str]) -> list[onnx.NodeProto] | None:
    if not rest:
        return [node]
    if not _chain_matches(view, node, rest[:1]):
        return None
    consumer = next(c for output in node.output if output for c in view.consumers.get(output, []))
    tail = _chain(view, consumer, rest[1:])
    return None if tail is None else [node, *tail]


def _chain_matches(view: GraphView, node: onnx.NodeProto, rest: list[str]) -> bool:
    if not rest:
        return True
    consumers = [c for output in node.output if output for c in view.consumers.get(output, [])]
    if len(consumers) != 1 or any(output in view.graph_outputs for output in node.output):
        return False
    nxt = consumers[0]
    return nxt.op_type == rest[0] and _chain_matches(view, nxt, rest[1:])
