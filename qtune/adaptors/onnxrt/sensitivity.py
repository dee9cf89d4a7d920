"""Cheap per-op sensitivity: how much quantizing one op alone perturbs its own output.

One fp32 run of the optimised model on a few samples exposes every quantizable op's inputs; then
each op runs alone as a single-node model (its weights fed as inputs) twice: on the fp32 inputs,
and on inputs fake-quantized in numpy exactly as the tune config asks (activation ranges from the
job's cached calibration when present, else the observed min/max; weights per channel or per
tensor with ORT's own `compute_scale_zp`). Score = ||y_q - y||² / ||y||² (relative MSE).
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from qtune.adaptors.onnxrt.graph import GraphView, weight_inputs
from qtune.tuning.config import OpConfig, TensorConfig, TuneConfig

logger = logging.getLogger(__name__)

MAX_SAMPLES = 32


def fake_quantize(array: np.ndarray, cfg: TensorConfig, bounds: tuple[float, float] | None = None,
                  axis: int | None = None) -> np.ndarray:
    """Quantize-dequantize `array` as ORT would (per tensor, or per channel along `axis`)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType

    qtype = (QuantType.QUInt8 if cfg.dtype == "uint8" else QuantType.QInt8).tensor_type
    symmetric = cfg.scheme == "sym"
    qmin, qmax = get_qmin_qmax_for_qType(qtype, reduce_range=bool(cfg.reduce_range), symmetric=symmetric)
    data = np.asarray(array, dtype=np.float32)
    if axis is not None and data.ndim > 0:
        moved = np.moveaxis(data, axis, 0)
        flat = moved.reshape(moved.shape[0], -1)
        lows, highs = flat.min(axis=1), flat.max(axis=1)
        out = np.empty_like(flat)
        for channel in range(flat.shape[0]):
            zero, scale = compute_scale_zp(np.float32(lows[channel]), np.float32(highs[channel]), qmin, qmax,
                                           symmetric)
            out[channel] = _qdq(flat[channel], float(scale), float(zero), int(qmin), int(qmax))
        return np.moveaxis(out.reshape(moved.shape), 0, axis)
    low, high = bounds if bounds is not None else (float(data.min()), float(data.max()))
    if not (np.isfinite(low) and np.isfinite(high)):
        return data
    zero, scale = compute_scale_zp(np.float32(low), np.float32(high), qmin, qmax, symmetric)
    return _qdq(data, float(scale), float(zero), int(qmin), int(qmax))


def _blockwise(op_cfg: OpConfig) -> bool:
    weight = op_cfg.weight
    return weight is not None and not weight.is_fp32 and str(weight.granularity or "").startswith("per_block_")


def fake_quantize_blocks(array: np.ndarray, cfg: TensorConfig, k_axis: int) -> np.ndarray:
    """Quantize-dequantize in blocks of `per_block_<n>` consecutive values along `k_axis`, as MLAS's
    MatMulNBits quantizer does: asym over [min(x, 0), max(x, 0)]; sym with the value of largest magnitude
    mapped to the most negative code (-8 for int4, -128 for int8)."""
    bits = 4 if cfg.dtype == "int4" else 8
    block = int(str(cfg.granularity).rsplit("_", 1)[1])
    data = np.moveaxis(np.asarray(array, dtype=np.float32), k_axis, -1)
    k = data.shape[-1]
    padded = -(-k // block) * block
    blocks = np.pad(data, [(0, 0)] * (data.ndim - 1) + [(0, padded - k)]).reshape(*data.shape[:-1], -1, block)
    if cfg.scheme == "sym":
        index = np.argmax(np.abs(blocks), axis=-1)[..., None]
        scale = np.take_along_axis(blocks, index, axis=-1) / -(2 ** (bits - 1))
        scale = np.where(scale == 0, 1.0, scale)
        codes = np.clip(np.rint(blocks / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        out = codes * scale
    else:
        low = np.minimum(blocks.min(axis=-1, keepdims=True), 0.0)
        high = np.maximum(blocks.max(axis=-1, keepdims=True), 0.0)
        scale = (high - low) / (2 ** bits - 1)
        scale = np.where(scale == 0, 1.0, scale)
        zero = np.clip(np.rint(-low / scale), 0, 2 ** bits - 1)
        out = (np.clip(np.rint(blocks / scale) + zero, 0, 2 ** bits - 1) - zero) * scale
    out = out.reshape(*data.shape[:-1], padded)[..., :k]
    return np.moveaxis(out.astype(np.float32), -1, k_axis)


def _qdq(data: np.ndarray, scale: float, zero: float, qmin: int, qmax: int) -> np.ndarray:
    if scale == 0:
        return data
    quantized = np.clip(np.rint(data / scale) + zero, qmin, qmax)
    return ((quantized - zero) * scale).astype(np.float32)


def _run_with_outputs(model_path: Path, proto: onnx.ModelProto, view: GraphView, tensors: list[str],
                      feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One fp32 run returning the named intermediate tensors."""
    import onnxruntime as ort

    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    existing = {value.name for value in exposed.graph.output}
    for name in tensors:
        if name in existing:
            continue
        info = view.value_info.get(name)
        elem = view.elem_type(name)
        if info is not None:
            exposed.graph.output.append(info)
        elif elem is not None:
            exposed.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    # Next to the model so relative external-data locations still resolve.
    tmp = model_path.parent / f".sensitivity-{os.getpid()}-{uuid.uuid4().hex[:8]}.onnx"
    try:
        onnx.save_model(exposed, str(tmp))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]
        values = session.run(None, feed)
    finally:
        tmp.unlink(missing_ok=True)
    return dict(zip(names, values, strict=True))


def _single_node_session(node: onnx.NodeProto, proto: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> Any:
    import onnxruntime as ort

    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arrays[name].dtype),
                                            [None] * arrays[name].ndim)
              for name in dict.fromkeys(n for n in node.input if n)]
    outputs = [helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)]
    graph = helper.make_graph([node], "single_op", inputs, outputs)
    model = helper.make_model(graph, opset_imports=list(proto.opset_import))
    model.ir_version = proto.ir_version
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _node_inputs(node: onnx.NodeProto, view: GraphView, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The op's input arrays: from the fp32 run, else the graph's constants."""
    if any(attribute.HasField("g") or attribute.graphs for attribute in node.attribute):
        raise ValueError("has subgraphs")
    arrays: dict[str, np.ndarray] = {}
    for tensor in node.input:
        if not tensor:
            continue
        array = values.get(tensor)
        if array is None:
            array = view.constant_array(tensor)
        if array is None:
            raise ValueError(f"input {tensor} unavailable")
        arrays[tensor] = np.asarray(array)
    return arrays


def _fake_quantized_inputs(node: onnx.NodeProto, view: GraphView, op_cfg: OpConfig, arrays: dict[str, np.ndarray],
                           ranges: dict[str, Any] | None) -> dict[str, np.ndarray]:
    """`arrays` with each float input fake-quantized as `op_cfg` (the op's config) asks."""
    from qtune.adaptors.onnxrt.calibration import tensor_range

    weights = dict(weight_inputs(node, view))
    quantized = dict(arrays)
    for tensor, array in arrays.items():
        if array.dtype != np.float32:
            continue
        if node.op_type == "Gather" and tensor == node.input[0] and _blockwise(op_cfg):
            assert op_cfg.weight is not None  # an embedding table: blocks along its width (GatherBlockQuantized)
            quantized[tensor] = fake_quantize_blocks(array, op_cfg.weight, array.ndim - 1)
        elif tensor in weights and _blockwise(op_cfg):
            assert op_cfg.weight is not None
            k_axis = 1 - weights[tensor] if array.ndim == 2 else array.ndim - 2
            quantized[tensor] = fake_quantize_blocks(array, op_cfg.weight, k_axis)
        elif _blockwise(op_cfg):  # weight-only: int8 compute quantizes the activations per block too
            if not op_cfg.activation.is_fp32 and op_cfg.weight is not None and tensor == node.input[0]:
                quantized[tensor] = fake_quantize_blocks(array, TensorConfig("int8", "sym", op_cfg.weight.granularity),
                                                         array.ndim - 1)
        elif tensor in weights:
            if op_cfg.weight is not None and not op_cfg.weight.is_fp32:
                axis = weights[tensor] if op_cfg.weight.granularity == "per_channel" else None
                quantized[tensor] = fake_quantize(array, op_cfg.weight, axis=axis)
        elif not op_cfg.activation.is_fp32:
            algorithm = op_cfg.activation.algorithm or "minmax"
            bounds = tensor_range((ranges or {}).get(algorithm), tensor)
            quantized[tensor] = fake_quantize(array, op_cfg.activation, bounds)
    return quantized


def _op_score(node: onnx.NodeProto, proto: onnx.ModelProto, view: GraphView, op_cfg: OpConfig,
              values: dict[str, np.ndarray], ranges: dict[str, Any] | None) -> float:
    """Relative MSE of the op's output, run alone on fake-quantized against fp32 inputs."""
    arrays = _node_inputs(node, view, values)
    session = _single_node_session(node, proto, arrays)
    reference = session.run([node.output[0]], arrays)[0]
    quantized = _fake_quantized_inputs(node, view, op_cfg, arrays, ranges)
    perturbed = session.run([node.output[0]], quantized)[0]
    reference = np.asarray(reference, dtype=np.float64)
    diff = np.asarray(perturbed, dtype=np.float64) - reference
    return float(np.sum(diff * diff) / (np.sum(reference * reference) + 1e-12))


def op_sensitivity(model_path: Path, cfg: TuneConfig, inputs: dict[str, np.ndarray],
                   ranges: dict[str, Any] | None = None) -> dict[str, float]:
    """{op name: relative MSE of its output when it alone is quantized as in `cfg`}.

    `ranges` maps an algorithm name to the job's cached TensorsData (optional)."""
    proto = onnx.load(str(model_path))
    structure = onnx.load(str(model_path), load_external_data=False)
    view = GraphView(proto)
    feed = {name: np.asarray(array)[:MAX_SAMPLES] for name, array in inputs.items() if name in view.graph_inputs}
    targets = [name for name, op in cfg.ops.items() if name in view.by_name and not op.is_fp32]
    needed: set[str] = set()
    for name in targets:
        node = view.by_name[name]
        needed.update(tensor for tensor in node.input if tensor and tensor not in view.constants)
    values = dict(feed)
    try:
        values.update(_run_with_outputs(model_path, structure, view,
                                        sorted(needed - set(feed)), feed))
    except Exception as exc:  # noqa: BLE001
        logger.warning("op sensitivity: fp32 run failed (%s); no scores", exc)
        return {}
    scores: dict[str, float] = {name: 0.0 for name, op in cfg.ops.items()}
    for name in targets:
        node = view.by_name[name]
        try:
            scores[name] = _op_score(node, proto, view, cfg.ops[name], values, ranges)
        except Exception as exc:  # noqa: BLE001 - an op we cannot isolate scores 0
            logger.debug("op sensitivity: cannot isolate %s (%s): %s", name, node.op_type, exc)
            scores[name] = 0.0
    return scores
