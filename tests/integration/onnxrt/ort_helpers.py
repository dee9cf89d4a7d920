"""Helpers shared by the ONNX Runtime adaptor tests: default tune configs and reading Q/DQ graphs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qtune.adaptors.onnxrt import OnnxRuntimeAdaptor
from qtune.tuning.config import OpConfig, TensorConfig, TuneConfig


def load(adaptor: OnnxRuntimeAdaptor, path: Path) -> Any:
    return adaptor.load_model({"framework": "onnxruntime", "path": str(path)})


def default_config(capability: dict[str, Any], approach: str = "static", quant_format: str = "QDQ",
                   samples: int = 100) -> TuneConfig:
    """The adaptor's preferred choice for every op (first element of each list)."""
    ops: dict[str, OpConfig] = {}
    for (name, op_type), entry in capability["opwise"].items():
        act = entry["activation"]
        activation = TensorConfig(act["dtype"][0], act.get("scheme", [None])[0],
                                  act.get("granularity", [None])[0], act.get("algorithm", [None])[0],
                                  bool(act.get("reduce_range", [False])[0]))
        weight = None
        if "weight" in entry:
            w = entry["weight"]
            weight = TensorConfig(w["dtype"][0], w.get("scheme", [None])[0], w.get("granularity", [None])[0],
                                  w.get("algorithm", [None])[0], bool(w.get("reduce_range", [False])[0]))
        ops[name] = OpConfig(op_type, activation, weight)
    return TuneConfig(approach, quant_format, ops, samples)


def set_op(cfg: TuneConfig, name: str, activation: dict[str, Any] | None = None,
           weight: dict[str, Any] | None = None) -> TuneConfig:
    """cfg with op `name`'s activation/weight fields replaced."""
    op = cfg.ops[name]
    new_activation = replace(op.activation, **activation) if activation else op.activation
    new_weight = replace(op.weight, **weight) if (weight and op.weight is not None) else op.weight
    return cfg.with_ops({name: OpConfig(op.op_type, new_activation, new_weight)})


# --- reading quantized graphs -------------------------------------------------------------------------

class QGraph:
    """A quantized model's graph with helpers to find the Q/DQ around a node."""

    def __init__(self, path: Path) -> None:
        self.proto = onnx.load(str(path))
        self.graph = self.proto.graph
        self.inits = {init.name: onnx.numpy_helper.to_array(init) for init in self.graph.initializer}
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.nodes = {node.name: node for node in self.graph.node}

    def op_types(self) -> list[str]:
        return [node.op_type for node in self.graph.node]

    def node(self, name: str) -> onnx.NodeProto:
        return self.nodes[name]

    def dq_of_input(self, name: str, index: int) -> onnx.NodeProto | None:
        producer = self.producer.get(self.node(name).input[index])
        return producer if producer is not None and producer.op_type == "DequantizeLinear" else None

    def qparams(self, dq: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(scale, zero point, quantized initializer or None) of a DequantizeLinear."""
        scale = self.value(dq.input[1])
        zero = self.value(dq.input[2]) if len(dq.input) > 2 else None
        return scale, zero, self.inits.get(dq.input[0])

    def value(self, name: str) -> np.ndarray:
        if name in self.inits:
            return self.inits[name]
        node = self.producer[name]
        assert node.op_type == "Constant"
        return onnx.numpy_helper.to_array(node.attribute[0].t)

    def has_qdq_around(self, name: str) -> bool:
        node = self.node(name)
        inputs = any(self.producer.get(t) is not None and self.producer[t].op_type == "DequantizeLinear"
                     for t in node.input if t)
        outputs = any(c.op_type == "QuantizeLinear" for t in node.output for c in self.consumers.get(t, []))
        return inputs or outputs
