"""Small read-only views of an ONNX graph: order, producers, consumers, weights."""

from __future__ import annotations

import heapq
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


@dataclass
class GraphView:
    """Index of one (main) graph. Built once per model; cheap to query."""

    proto: onnx.ModelProto

    def __post_init__(self) -> None:
        graph = self.proto.graph
        self.nodes: list[onnx.NodeProto] = topological_nodes(graph)
        self.by_name: dict[str, onnx.NodeProto] = {node.name: node for node in self.nodes}
        self.initializers: dict[str, onnx.TensorProto] = {init.name: init for init in graph.initializer}
        self.constants: set[str] = set(self.initializers)
        for node in self.nodes:
            if node.op_type == "Constant":
                self.constants.update(node.output)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for output in node.output:
                if output:
                    self.producer[output] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.graph_inputs = [value.name for value in graph.input if value.name not in self.initializers]
        self.graph_outputs = [value.name for value in graph.output]
        self.value_info: dict[str, onnx.ValueInfoProto] = {}
        for value in [*graph.value_info, *graph.input, *graph.output]:
            self.value_info[value.name] = value

    def elem_type(self, tensor: str) -> int | None:
        if tensor in self.initializers:
            return self.initializers[tensor].data_type
        value = self.value_info.get(tensor)
        if value is not None and value.type.HasField("tensor_type"):
            return value.type.tensor_type.elem_type
        return None

    def is_float(self, tensor: str) -> bool:
        return self.elem_type(tensor) in FLOAT_TYPES

    def constant_array(self, tensor: str) -> np.ndarray | None:
        if tensor in self.initializers:
            return numpy_helper.to_array(self.initializers[tensor])
        node = self.producer.get(tensor)
        if node is not None and node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    return numpy_helper.to_array(attribute.t)
        return None

    def activation_inputs(self, node: onnx.NodeProto) -> list[str]:
        """Float inputs that are neither the op's weights (see `weight_inputs`) nor its bias (ORT
        quantizes a Conv/Gemm bias to int32 with scale = input scale × weight scale)."""
        skip = {name for name, _ in weight_inputs(node, self)} | set(bias_inputs(node))
        return [name for name in node.input if name and name not in skip and self.is_float(name)]


def topological_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes in a topological order, stable with respect to the file order (Kahn)."""
    produced_by: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for output in node.output:
            produced_by[output] = index
    dependents: dict[int, list[int]] = defaultdict(list)
    pending = [0] * len(graph.node)
    for index, node in enumerate(graph.node):
        parents = {produced_by[name] for name in all_node_inputs(node) if name in produced_by}
        parents.discard(index)
        pending[index] = len(parents)
        for parent in parents:
            dependents[parent].append(index)
    ready = [index for index, count in enumerate(pending) if count == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for child in dependents[index]:
            pending[child] -= 1
            if pending[child] == 0:
                heapq.heappush(ready, child)
    if len(order) != len(graph.node):  # a cycle: keep the file order rather than fail
        return list(graph.node)
    return [graph.node[index] for index in order]


def all_node_inputs(node: onnx.NodeProto) -> list[str]:
    """Inputs including the outer-scope names used by subgraphs (If/Loop/Scan bodies)."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        subgraphs = [attribute.g] if attribute.HasField("g") else list(attribute.graphs)
        for subgraph in subgraphs:
            local = {init.name for init in subgraph.initializer} | {value.name for value in subgraph.input}
            for sub_node in subgraph.node:
                local.update(sub_node.output)
            for sub_node in subgraph.node:
                names.extend(name for name in all_node_inputs(sub_node) if name and name not in local)
    return names


def _attr(node: onnx.NodeProto, name: str, default: int | float = 0) -> int | float:
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def weight_inputs(node: onnx.NodeProto, view: GraphView) -> list[tuple[str, int]]:
    """(weight initializer name, per-channel axis) for the op's weight inputs, i.e. the constant
    inputs that ORT quantizes with the *weight* type. Empty for ops without weights."""
    def constant(index: int) -> str | None:
        if len(node.input) > index and node.input[index] in view.initializers:
            name = node.input[index]
            return name if view.initializers[name].data_type in FLOAT_TYPES else None
        return None

    op = node.op_type
    if op == "Conv":
        name = constant(1)
        return [(name, 0)] if name else []
    if op == "ConvTranspose":
        name = constant(1)
        return [(name, 1)] if name else []
    if op == "Gemm":
        name = constant(1)
        return [(name, 0 if _attr(node, "transB", 0) else 1)] if name else []
    if op == "MatMul":
        name = constant(1)
        if name:
            rank = len(view.initializers[name].dims)
            return [(name, max(rank - 1, 0))]
        return []
    if op == "Attention":
        name = constant(1)
        return [(name, 1)] if name else []
    if op == "LSTM":
        return [(name, 0) for name in (constant(1), constant(2)) if name]
    return []


def bias_inputs(node: onnx.NodeProto) -> list[str]:
    if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2 and node.input[2]:
        return [node.input[2]]
    return []


def ensure_node_names(proto: onnx.ModelProto) -> int:
    """Give every unnamed (or duplicate-named) node of the main graph a unique name: ORT's
    quantizer addresses nodes by name. Returns how many nodes were renamed."""
    seen: set[str] = set()
    renamed = 0
    for index, node in enumerate(proto.graph.node):
        if not node.name or node.name in seen:
            base = node.name or f"{node.op_type}_{index}"
            candidate, suffix = base, 1
            while candidate in seen:
                candidate, suffix = f"{base}_{suffix}", suffix + 1
            node.name = candidate
            renamed += 1
        seen.add(node.name)
    return renamed
