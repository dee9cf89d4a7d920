"""Light int8 chains: element-wise ops that ONNX Runtime runs int8 from one compute-heavy op to the next.

A quantized Conv hands its output to whatever follows. When what follows is a group of light ops (Add,
Mul, Clip, Relu, ...: a hard-swish, a residual Add, a learnable affine) and all of them are int8 too, ORT
runs the group as QLinearAdd/QLinearMul and folds Clip/Relu into the quantization: no DequantizeLinear,
no fp32 pass, until the next int8 Conv. Quantizing only some of them leaves Q/DQ pairs around fp32 kernels,
which costs more than it saves (FIELD-NOTES). So the adaptor declares each such group, a *light chain*, with
its *ends* (the compute-heavy ops it connects), and the tuner quantizes a chain whole, and only when its
ends are int8.

A chain is a connected group of quantizable light ops (connected through the tensors they pass each other)
whose every non-constant input comes from a quantizable op and whose every output goes only to quantizable
ops (no graph output): otherwise some boundary stays fp32 and the chain would leave a Q/DQ pair anyway.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx

from qtune.adaptors.onnxrt.graph import GraphView

HEAVY_TYPES = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})


def _components(view: GraphView, light: set[str]) -> list[list[str]]:
    """Light ops grouped by the tensors they pass each other (union-find), in graph order."""
    parent = {name: name for name in light}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for name in light:
        for tensor in view.by_name[name].input:
            producer = view.producer.get(tensor)
            if producer is not None and producer.name in light:
                parent[root(name)] = root(producer.name)
    groups: dict[str, list[str]] = {}
    for node in view.nodes:
        if node.name in light:
            groups.setdefault(root(node.name), []).append(node.name)
    return list(groups.values())


def _ends(view: GraphView, ordered: list[str], quantizable: set[str]) -> list[str] | None:
    """The ops outside the chain `ordered` (its ops in graph order) that feed or read it, in the order met, when
    every one is quantizable; else None."""
    members = set(ordered)
    ends: dict[str, None] = {}
    for name in ordered:
        node = view.by_name[name]
        for tensor in node.input:
            if not tensor or tensor in view.constants:
                continue
            producer = view.producer.get(tensor)
            if producer is None or producer.name not in quantizable:
                return None
            if producer.name not in members:
                ends[producer.name] = None
        for tensor in node.output:
            if tensor in view.graph_outputs:
                return None
            for consumer in view.consumers.get(tensor, []):
                if consumer.name not in quantizable:
                    return None
                if consumer.name not in members:
                    ends[consumer.name] = None
    return list(ends)


def light_chains(view: GraphView, quantizable: Iterable[str]) -> list[dict[str, list[str]]]:
    """Every light chain of the graph as {"ops": [...], "ends": [...]} (names, graph order)."""
    quantizable = set(quantizable)
    light = {name for name in quantizable if view.by_name[name].op_type not in HEAVY_TYPES}
    chains = []
    for members in _components(view, light):
        ends = _ends(view, members, quantizable)  # quantizable ops outside a component: heavy ones
        if ends:
            chains.append({"ops": members, "ends": ends})
    return chains


def chain_node_types(view: GraphView, chains: list[dict[str, list[str]]]) -> dict[str, int]:
    """How many ops of each type the chains hold (for the log)."""
    counts: dict[str, int] = {}
    for chain in chains:
        for name in chain["ops"]:
            node: onnx.NodeProto = view.by_name[name]
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
