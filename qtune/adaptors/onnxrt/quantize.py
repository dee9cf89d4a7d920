"""Turn a tune config into ONNX Runtime quantization calls (`quantize_static` / `quantize_dynamic`).

How per-op choices map onto ORT's public API:
- an op in fp32 → `nodes_to_exclude`;
- activations: the op that *consumes* a tensor decides its settings (first quantized consumer in
  graph order; a tensor no quantized op consumes follows its quantized producer). Settings are
  `TensorQuantOverrides` per tensor: `quant_type` (uint8/int8), `symmetric`; reduce_range (7-bit)
  for activations, which ORT only accepts for initializers, is given as a `scale`/`zero_point`
  computed with ORT's own `compute_scale_zp` on the reduced range;
- the calibration algorithm: per tensor, the range of the owner's algorithm (merged TensorsData
  passed via `calibration_cache_path`);
- weights: `TensorQuantOverrides` per weight initializer: `quant_type`, `symmetric`,
  `reduce_range` and, for per-channel, `axis`. In QDQ the global `per_channel` stays False: ORT 1.32
  makes a weight per-channel exactly when its override has an `axis` (a per-tensor override wins
  over the global flag). QOperator/dynamic only honour the global flag, so there it is set when any
  op wants per-channel, and per-tensor ops get one shared rmin/rmax for all channels (numerically
  per-tensor);
- QDQ post-processing: an op left in fp32 reads the fp32 tensors (not a DequantizeLinear of them),
  except the output of a quantized Conv/MatMul/Gemm, which stays quantized so that op runs as an int8
  kernel (see INT8_KERNELS); an op whose activation (or weight) alone is fp32 gets that input back
  in fp32; Q/DQ left without consumers are removed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from qtune.adaptors.onnxrt.graph import GraphView, weight_inputs
from qtune.adaptors.onnxrt.model import OnnxModel, save_model
from qtune.adaptors.onnxrt.workspace import private_model_path
from qtune.tuning.config import OpConfig, TensorConfig, TuneConfig

logger = logging.getLogger(__name__)


def _quant_type(dtype: str) -> Any:
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[dtype]


@dataclass
class QuantPlan:
    """Everything decided before calling ORT; also written next to the model as a record."""

    approach: str
    quant_format: str
    quantized: dict[str, OpConfig]
    excluded: dict[str, str]
    owner: dict[str, str] = field(default_factory=dict)
    """activation tensor → op whose activation settings it follows."""
    overrides: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    global_per_channel: bool = False
    restore: dict[str, list[int]] = field(default_factory=dict)
    """op → input indices to give back in fp32 after QDQ quantization."""

    def record(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if isinstance(value, np.ndarray | np.generic):
                return np.asarray(value).tolist()
            if hasattr(value, "name") and not isinstance(value, str):
                return value.name
            return value

        return {
            "approach": self.approach,
            "format": self.quant_format,
            "quantized": sorted(self.quantized),
            "excluded": dict(sorted(self.excluded.items())),
            "global_per_channel": self.global_per_channel,
            "overrides": {name: [{k: plain(v) for k, v in item.items()} for item in items]
                          for name, items in sorted(self.overrides.items())},
            "restore_fp32_inputs": self.restore,
        }


def _excluded_because(node: Any, op_cfg: OpConfig | None, capability: dict[str, Any],
                      forced_fp32: dict[str, str], approach: str) -> str | None:
    """Why an op stays fp32 under `approach` for reasons common to static and dynamic; None if none."""
    if op_cfg is None:
        return "not in the tune config"
    if node.name in forced_fp32:
        return forced_fp32[node.name]
    if op_cfg.is_fp32:
        return "fp32 in the tune config"
    if approach not in capability.get("approach", []):
        if approach == "dynamic" and node.op_type == "Conv":
            return "static only (dynamic ConvInteger is slow on CPU)"
        return f"no {approach} quantization in ONNX Runtime for this op"
    return None


def plan_static(view: GraphView, cfg: TuneConfig, quantizable: dict[str, dict[str, Any]],
                forced_fp32: dict[str, str]) -> QuantPlan:
    """Which ops ORT quantizes statically and with which tensor overrides (ranges come later)."""
    quantized: dict[str, OpConfig] = {}
    excluded: dict[str, str] = {}
    restore: dict[str, list[int]] = {}
    for node in view.nodes:
        name = node.name
        if name not in quantizable:
            continue
        op_cfg = cfg.ops.get(name)
        reason = _excluded_because(node, op_cfg, quantizable[name], forced_fp32, "static")
        if reason is not None:
            excluded[name] = reason
            continue
        weights = weight_inputs(node, view)
        act_fp32 = op_cfg.activation.is_fp32
        weight_fp32 = op_cfg.weight is None or op_cfg.weight.is_fp32
        if cfg.format == "QOperator" and (act_fp32 or (weights and weight_fp32)):
            excluded[name] = "QOperator cannot keep only the activation or only the weight in fp32"
            continue
        quantized[name] = op_cfg
        if act_fp32:  # weight-only: give the activations back in fp32 after quantization
            restore[name] = [i for i, tensor in enumerate(node.input) if tensor in view.activation_inputs(node)]
        if weights and weight_fp32:
            weight_names = {w for w, _ in weights}
            restore[name] = sorted({*restore.get(name, []),
                                    *[i for i, tensor in enumerate(node.input) if tensor in weight_names]})
    # Ops in fp32 read fp32 tensors (QDQ): give back every float input, except the output of an op
    # that runs as an int8 kernel (see INT8_KERNELS): without its output Q it would run in fp32.
    if cfg.format != "QOperator":
        for name in excluded:
            node = view.by_name[name]
            restore[name] = [i for i, tensor in enumerate(node.input) if tensor and view.is_float(tensor)
                             and not _int8_kernel_output(view, quantized, tensor)]

    plan = QuantPlan(cfg.approach, cfg.format, quantized, excluded, restore=restore)
    # Owners of activation tensors: the first quantized consumer whose activation is quantized,
    # else the quantized producer.
    for node in view.nodes:
        op_cfg = quantized.get(node.name)
        if op_cfg is None or op_cfg.activation.is_fp32:
            continue
        for tensor in view.activation_inputs(node):
            plan.owner.setdefault(tensor, node.name)
    for node in view.nodes:
        op_cfg = quantized.get(node.name)
        if op_cfg is None or op_cfg.activation.is_fp32:
            continue
        for tensor in node.output:
            if tensor and view.is_float(tensor):
                plan.owner.setdefault(tensor, node.name)
    return plan


INT8_KERNELS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
"""Ops ORT runs as int8 kernels (QLinearConv, QLinearMatMul, QGemm) only when the QDQ unit around them is
complete: DequantizeLinear on the inputs AND QuantizeLinear on the output. When every consumer of such an
op's output is fp32, that Q still stays and the consumers read its DequantizeLinear (as ORT's own
op-type-restricted quantization does); giving them the fp32 tensor would drop the Q, and the op would
run in fp32 on dequantized inputs: on PP-OCRv4's recogniser, quantizing only its Conv ops that way
kept 33 of 38 Conv in fp32 and ran 0.7x of fp32; with their outputs quantized 37 became QLinearConv and
the config ran 1.1-1.3x (independent re-measure, 1 and 2 threads, on a busy 2-core machine)."""


def _int8_kernel_output(view: GraphView, quantized: dict[str, OpConfig], tensor: str) -> bool:
    """`tensor` is the output of a quantized op (activation too) that runs as an int8 kernel."""
    producer = view.producer.get(tensor)
    if producer is None or producer.op_type not in INT8_KERNELS:
        return False
    op_cfg = quantized.get(producer.name)
    return op_cfg is not None and not op_cfg.activation.is_fp32


def owner_algorithms(plan: QuantPlan) -> dict[str, str]:
    return {tensor: plan.quantized[op].activation.algorithm or "minmax" for tensor, op in plan.owner.items()}


def _activation_override(tensor_cfg: TensorConfig, bounds: tuple[float, float] | None,
                         is_initializer: bool) -> dict[str, Any]:
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    quant_type = _quant_type(tensor_cfg.dtype)
    symmetric = tensor_cfg.scheme == "sym"
    override: dict[str, Any] = {"quant_type": quant_type, "symmetric": symmetric}
    if tensor_cfg.reduce_range:
        if is_initializer:
            override["reduce_range"] = True
        elif bounds is not None:
            # ORT accepts reduce_range only for initializers: give the 7-bit scale/zero point directly.
            qmin, qmax = get_qmin_qmax_for_qType(quant_type.tensor_type, reduce_range=True, symmetric=symmetric)
            zero_point, scale = compute_scale_zp(np.array(bounds[0], dtype=np.float32),
                                                 np.array(bounds[1], dtype=np.float32),
                                                 qmin, qmax, symmetric)
            override = {"quant_type": quant_type, "scale": np.array(scale, dtype=np.float32),
                        "zero_point": np.array(zero_point, dtype=qmin.dtype)}
    return override


def fill_overrides(plan: QuantPlan, view: GraphView, ranges: Any, per_channel_ok: bool) -> None:
    """TensorQuantOverrides for every owned activation tensor and every quantized weight."""
    from qtune.adaptors.onnxrt.calibration import tensor_range

    known = set(view.value_info) | set(view.initializers)
    for tensor, op_name in plan.owner.items():
        if tensor not in known:
            logger.debug("no type information for %s: ORT's defaults apply", tensor)
            continue
        activation = plan.quantized[op_name].activation
        if plan.quant_format == "QOperator" and activation.dtype != "uint8":
            logger.warning("op %s: QOperator activations are uint8; %s ignored", op_name, activation.dtype)
            activation = TensorConfig("uint8", activation.scheme, activation.granularity,
                                      activation.algorithm, activation.reduce_range)
        plan.overrides[tensor] = [_activation_override(activation, tensor_range(ranges, tensor),
                                                       tensor in view.initializers)]
    _weight_overrides(plan, view, per_channel_ok)


def _weight_overrides(plan: QuantPlan, view: GraphView, per_channel_ok: bool) -> None:
    wanted: dict[str, tuple[TensorConfig, int, str]] = {}
    for name, op_cfg in plan.quantized.items():
        node = view.by_name[name]
        if node.op_type == "LSTM":
            continue  # ORT's LSTM rule quantizes W/R with the model-wise settings only
        for weight, axis in weight_inputs(node, view):
            weight_cfg = op_cfg.weight
            if weight_cfg is None or weight_cfg.is_fp32:
                weight_cfg = TensorConfig("int8", "sym", "per_tensor", "minmax")  # restored to fp32 later
            if weight in wanted and wanted[weight][0] != weight_cfg:
                logger.info("weight %s is shared; %s follows %s", weight, name, wanted[weight][2])
                continue
            wanted.setdefault(weight, (weight_cfg, axis, name))
    per_channel_wanted = per_channel_ok and any(cfg.granularity == "per_channel" for cfg, _, _ in wanted.values())
    # Only QDQ honours per-weight axes; QOperator and dynamic follow the global flag.
    plan.global_per_channel = per_channel_wanted and (plan.quant_format == "QOperator" or plan.approach == "dynamic")
    for weight, (weight_cfg, axis, _op) in wanted.items():
        override: dict[str, Any] = {
            "quant_type": _quant_type(weight_cfg.dtype),
            "symmetric": weight_cfg.scheme != "asym",
            "reduce_range": bool(weight_cfg.reduce_range),
        }
        per_channel = per_channel_ok and weight_cfg.granularity == "per_channel"
        if plan.global_per_channel:
            override["axis"] = axis
            if not per_channel:  # one range for every channel = per-tensor numerics
                array = numpy_helper.to_array(view.initializers[weight]).astype(np.float32)
                override["rmin"] = np.array(min(float(array.min()), 0.0), dtype=np.float32)
                override["rmax"] = np.array(max(float(array.max()), 0.0), dtype=np.float32)
        elif per_channel:
            override["axis"] = axis
        plan.overrides[weight] = [override]


# --- QDQ post-processing -------------------------------------------------------------------------

def restore_fp32_inputs(proto: onnx.ModelProto, original: GraphView, restore: dict[str, list[int]]) -> int:
    """Rewire the listed inputs of the listed nodes from DequantizeLinear outputs back to fp32
    tensors, then drop Q/DQ nodes and initializers nobody uses. Returns how many inputs moved."""
    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {init.name: init for init in graph.initializer}
    by_name = {node.name: node for node in graph.node}
    moved = 0
    for node_name, indices in restore.items():
        node = by_name.get(node_name)
        original_node = original.by_name.get(node_name)
        if node is None or original_node is None:
            continue  # e.g. a Relu ORT removed as redundant
        for index in indices:
            if index >= len(node.input) or index >= len(original_node.input):
                continue
            source = _fp32_source(node.input[index], producer, original, original_node.input[index])
            if source is None or source == node.input[index]:
                continue
            if source in original.initializers and source not in initializers and source not in producer:
                graph.initializer.append(original.initializers[source])
                initializers[source] = original.initializers[source]
            node.input[index] = source
            moved += 1
    _prune(proto)
    return moved


def _fp32_source(tensor: str, producer: dict[str, onnx.NodeProto], original: GraphView,
                 original_tensor: str) -> str | None:
    node = producer.get(tensor)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    quant = producer.get(node.input[0])
    if quant is not None and quant.op_type == "QuantizeLinear":
        from onnxruntime.quantization.quant_utils import add_quant_input_suffix

        # Only the very tensor the op read in fp32 will do: when ORT folded a Relu/Clip into the
        # quantization, the Q reads the pre-activation tensor instead (see keep_removable below).
        if quant.input[0] in (original_tensor, add_quant_input_suffix(original_tensor)):
            return quant.input[0]
        logger.debug("cannot give %s back in fp32: its Q reads %s", original_tensor, quant.input[0])
        return None
    if original_tensor in original.initializers:  # a weight ORT quantized offline
        return original_tensor
    return None


def _prune(proto: onnx.ModelProto) -> None:
    graph = proto.graph
    outputs = {value.name for value in graph.output}
    changed = True
    while changed:
        changed = False
        used = {name for node in graph.node for name in node.input} | outputs
        for node in list(graph.node):
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in used for o in node.output):
                graph.node.remove(node)
                changed = True
    used = {name for node in graph.node for name in node.input} | outputs
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)


# --- dynamic --------------------------------------------------------------------------------------

def plan_dynamic(view: GraphView, cfg: TuneConfig, quantizable: dict[str, dict[str, Any]],
                 forced_fp32: dict[str, str]) -> QuantPlan:
    quantized: dict[str, OpConfig] = {}
    excluded: dict[str, str] = {}
    for node in view.nodes:
        name = node.name
        if name not in quantizable:
            continue
        op_cfg = cfg.ops.get(name)
        reason = _excluded_because(node, op_cfg, quantizable[name], forced_fp32, "dynamic")
        if reason is not None:
            excluded[name] = reason
        elif op_cfg.activation.is_fp32 or (op_cfg.weight is not None and op_cfg.weight.is_fp32):
            excluded[name] = "dynamic quantization needs both activation and weight quantized"
        else:
            quantized[name] = op_cfg
    return QuantPlan("dynamic", cfg.format, quantized, excluded)


def run_dynamic(source: OnnxModel, view: GraphView, plan: QuantPlan, output: Path, per_channel_ok: bool) -> None:
    """quantize_dynamic. ORT's dynamic quantizer itself rewrites every Gemm (alpha = beta = 1, no
    transA) as `<name>_MatMul` [+ `<name>_Add`] and carries weight overrides over to a transposed B,
    so an op is addressed under both names."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _weight_overrides(plan, view, per_channel_ok)
    op_types = sorted({"MatMul" if view.by_name[name].op_type == "Gemm" else view.by_name[name].op_type
                       for name in plan.quantized})
    weight_types = [op.weight.dtype for op in plan.quantized.values() if op.weight is not None]
    weight_type = QuantType.QUInt8 if weight_types and all(t == "uint8" for t in weight_types) else QuantType.QInt8
    excluded = set(view.by_name) - set(plan.quantized)
    excluded |= {f"{name}_{suffix}" for name in excluded if view.by_name[name].op_type == "Gemm"
                 for suffix in ("MatMul", "Add")}
    external = bool(source.external_data_files())
    with private_model_path(source.path) as private:
        quantize_dynamic(
            str(private), str(output),
            op_types_to_quantize=op_types,
            per_channel=plan.global_per_channel,
            reduce_range=False,
            weight_type=weight_type,
            nodes_to_exclude=sorted(excluded),
            use_external_data_format=external,
            extra_options={
                "DefaultTensorType": onnx.TensorProto.FLOAT,  # needed by fused transformer graphs
                "MatMulConstBOnly": True,
                "TensorQuantOverrides": plan.overrides,
            },
        )


REMOVABLE_ACTIVATIONS = ("Relu", "Clip")


def keep_removable_activations(view: GraphView, plan: QuantPlan) -> bool:
    """ORT folds a quantized Relu/Clip into the Q of its input. When such an activation feeds an op
    that must read fp32, keep the activation explicit so its real output can be handed over
    (ORT's runtime QDQ optimiser still drops a redundant Relu/Clip before a Q)."""
    if plan.quant_format == "QOperator":
        return False
    for name in plan.quantized:
        node = view.by_name[name]
        if node.op_type not in REMOVABLE_ACTIVATIONS:
            continue
        for output in node.output:
            for consumer in view.consumers.get(output, []):
                if consumer.name in plan.restore and any(
                        consumer.input[i] == output for i in plan.restore[consumer.name] if i < len(consumer.input)):
                    return True
    return False


def run_static(source: OnnxModel, view: GraphView, plan: QuantPlan, ranges: Any, output: Path,
               merged_cache: Path) -> None:
    """quantize_static on the ranges merged for this trial (ORT reads them as its calibration cache
    and does not calibrate), then the QDQ post-processing."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data

    save_tensors_data(ranges, merged_cache)
    op_types = sorted({view.by_name[name].op_type for name in plan.quantized})
    external = bool(source.external_data_files())
    started = time.perf_counter()
    with private_model_path(source.path) as private:
        quantize_static(
            str(private), str(output),
            calibration_data_reader=None,
            quant_format=QuantFormat.QOperator if plan.quant_format == "QOperator" else QuantFormat.QDQ,
            op_types_to_quantize=op_types,
            per_channel=plan.global_per_channel,
            reduce_range=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=sorted(set(view.by_name) - set(plan.quantized)),
            use_external_data_format=external,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"TensorQuantOverrides": plan.overrides, "ActivationSymmetric": False,
                           "QDQKeepRemovableActivations": keep_removable_activations(view, plan)},
            calibration_cache_path=str(merged_cache),
        )
    logger.debug("quantize_static took %.2fs", time.perf_counter() - started)
    if plan.quant_format != "QOperator" and plan.restore:
        proto = onnx.load(str(output))
        moved = restore_fp32_inputs(proto, view, plan.restore)
        if moved:
            logger.info("gave %d op inputs back in fp32 (fp32 ops read fp32 tensors)", moved)
            save_model(proto, output, external=external or None)
