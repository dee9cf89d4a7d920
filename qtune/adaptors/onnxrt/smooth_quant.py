"""SmoothQuant on the ONNX graph (Xiao et al. 2023), natively: no Neural Compressor, no numpy < 2 pin.

For a MatMul/Gemm Y = X·W with a constant W, an activation X whose channels (last axis) carry outliers
is hard to quantize per tensor while W, quantized per output channel, is easy. With a per-input-channel
factor s, Y = (X / s)·(diag(s)·W): the outliers move into W's rows, where per-channel int8 absorbs
them. s_j = max|X_j|^α / max|W_j|^(1-α); α = 0 leaves X as is, α = 1 flattens it entirely.

1/s must be applied to X at no cost, so it is folded into the op that produces X where that is exact:
  - LayerNormalization (last axis; also ORT's fused SkipLayerNormalization and the RMS forms): its scale
    and bias divided by s;
  - a MatMul/Gemm with a constant weight (and its constant bias Add): its output columns divided by s;
  - through a Relu on the way (relu(x / s) = relu(x) / s for s > 0).
The folding must change nothing but X: X (and every tensor between the absorber and X) may feed only
the MatMuls being smoothed, and the absorber's constants may serve no other op. In a post-norm
transformer (BERT, MiniLM) the normalised tensor also feeds the residual Add, so no fold is exact;
there `unabsorbed="mul"` inserts an fp32 `Mul(X, 1/s)` (one element-wise pass over X, exact, kept out
of quantization: its output is what the MatMul's QuantizeLinear reads), while `unabsorbed="skip"` leaves
the MatMul alone. The adaptor inserts Mul: an element-wise pass costs a small fraction of the MatMul it
lets stay int8, and otherwise SmoothQuant could not act on a post-norm model at all.

MatMuls sharing one X (Q, K and V projections) share one s, from the max of |W_j| over all their weights.
Only groups whose X has outlier channels (largest channel max at least `min_ratio` times the median
channel max) are smoothed: elsewhere s would only move quantization error around. With alpha `per_layer`
each such group takes its own alpha, or none, by its int8 error on calibration rows (smooth_alpha.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from qtune.adaptors.onnxrt.graph import GraphView, _attr
from qtune.adaptors.onnxrt.smooth_alpha import PER_LAYER_GRID, RowSample, choose_alpha
from qtune.spec.base import SMOOTH_QUANT_AUTO_ALPHAS
from qtune.spec.base import SMOOTH_QUANT_PER_LAYER as PER_LAYER
from qtune.tuning.space import SMOOTH_QUANT

logger = logging.getLogger(__name__)

ALPHA_AUTO = SMOOTH_QUANT_AUTO_ALPHAS
"""The α values `smoothQuant: {alpha: auto}` lets the tuner try (preferred first: 0.5, the paper's default)."""
EXTRA_KEY = SMOOTH_QUANT
"""TuneConfig.extras key carrying a static config's α (absent: no SmoothQuant)."""
OUTLIER_RATIO = 4.0
"""A group is smoothed when max_j max|X_j| >= this × median_j max|X_j|."""
EPS = 1e-5
"""Floor of max|X_j|, max|W_j| and s (the reference implementation's clamp): a channel that is always 0
gets a tiny s, which shrinks its weight row instead of dividing by zero."""
SMOOTH_VERSION = 2
"""Bump when the transform changes, so cached smoothed models are rebuilt."""


NORMS = {"LayerNormalization": (1, 2), "SkipLayerNormalization": (2, 3), "SimplifiedLayerNormalization": (1,),
         "SkipSimplifiedLayerNormalization": (2,)}
"""Normalisations over the last axis → the inputs (scale, bias) that scale their output 0 per channel. ORT's
transformer optimiser fuses the residual Add with the LayerNorm into SkipLayerNormalization, whose output 3
(the residual sum) does not depend on the scale and bias."""


@dataclass
class SmoothGroup:
    """MatMuls reading one activation tensor, smoothed with one s."""

    activation: str
    matmuls: list[str]
    absorber: str | None = None
    """Node whose constants take 1/s ("LayerNormalization", "MatMul" or "Gemm" node name), None: none exact."""
    bias: str | None = None
    """The absorbing MatMul's constant bias (an Add's initializer input), divided by s as well."""
    path: list[str] = field(default_factory=list)
    """Tensors from the absorber's output to `activation` (a Relu in between adds one)."""


def _weight_axis(node: onnx.NodeProto) -> int:
    """Axis of the constant weight along the input channels (K): MatMul [K, N]; Gemm transB [N, K]."""
    return 1 if node.op_type == "Gemm" and _attr(node, "transB", 0) else 0


def _smoothable(node: onnx.NodeProto, view: GraphView) -> bool:
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in view.initializers:
        return False
    if len(view.initializers[node.input[1]].dims) != 2 or len(view.consumers.get(node.input[1], [])) != 1:
        return False
    if node.op_type == "Gemm" and (_attr(node, "transA", 0) or float(_attr(node, "alpha", 1.0)) != 1.0):
        return False
    return node.input[0] not in view.initializers


def find_groups(view: GraphView) -> list[SmoothGroup]:
    """Every activation read only by smoothable MatMul/Gemm ops, with the op that can absorb 1/s (if any)."""
    by_input: dict[str, list[str]] = {}
    for node in view.nodes:
        if _smoothable(node, view):
            by_input.setdefault(node.input[0], []).append(node.name)
    groups = []
    for tensor, names in by_input.items():
        readers = view.consumers.get(tensor, [])
        if len(readers) != len(names) or any(n.input[0] != tensor for n in readers):
            groups.append(SmoothGroup(tensor, names))  # X also feeds other ops (or twice): no fold
            continue
        groups.append(_with_absorber(SmoothGroup(tensor, names), view))
    return groups


def _sole_consumer(view: GraphView, tensor: str) -> bool:
    return len(view.consumers.get(tensor, [])) == 1 and tensor not in view.graph_outputs


def _unshared_constant(view: GraphView, tensor: str) -> bool:
    return tensor in view.initializers and len(view.consumers.get(tensor, [])) == 1


def _with_absorber(group: SmoothGroup, view: GraphView) -> SmoothGroup:
    tensor = group.activation
    if tensor in view.graph_outputs:
        return group
    path = [tensor]
    producer = view.producer.get(tensor)
    if producer is not None and producer.op_type == "Relu" and _sole_consumer(view, producer.input[0]):
        tensor = producer.input[0]
        path.append(tensor)
        producer = view.producer.get(tensor)
    if producer is None:
        return group
    if producer.op_type in NORMS and producer.output[0] == tensor and _attr(producer, "axis", -1) == -1:
        scales = [producer.input[i] for i in NORMS[producer.op_type] if i < len(producer.input) and producer.input[i]]
        if scales and all(_unshared_constant(view, name) for name in scales):
            return SmoothGroup(group.activation, group.matmuls, producer.name, None, path)
        return group
    bias = None
    if producer.op_type == "Add":
        constants = [name for name in producer.input if name in view.initializers]
        others = [name for name in producer.input if name not in view.initializers]
        if len(constants) != 1 or len(others) != 1 or not _unshared_constant(view, constants[0]):
            return group
        if len(view.initializers[constants[0]].dims) != 1 or not _sole_consumer(view, others[0]):
            return group
        bias, producer = constants[0], view.producer.get(others[0])
    if producer is None or not _smoothable(producer, view):
        return group
    if producer.op_type == "Gemm" and len(producer.input) > 2 and producer.input[2]:
        if bias is not None or not _unshared_constant(view, producer.input[2]):
            return group
        if float(_attr(producer, "beta", 1.0)) != 1.0 or len(view.initializers[producer.input[2]].dims) != 1:
            return group
        bias = producer.input[2]
    return SmoothGroup(group.activation, group.matmuls, producer.name, bias, path)


def activation_stats(model: onnx.ModelProto, tensors: list[str], batches: list[dict[str, np.ndarray]],
                     threads: int | None = None, keep_rows: bool = False
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-channel (last axis) max|X| of each tensor over the batches, running the fp32 model once per batch;
    with `keep_rows`, also a bounded, evenly thinned sample of each tensor's rows (for the per-layer alpha)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {value.name for value in probe.graph.output}
    for name in tensors:
        if name not in present:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out: dict[str, np.ndarray] = {}
    samples: dict[str, RowSample] = {}
    for feed in batches:
        values = session.run(tensors, feed)
        for name, value in zip(tensors, values, strict=True):
            flat = np.abs(np.asarray(value, dtype=np.float32)).reshape(-1, value.shape[-1]).max(axis=0)
            out[name] = flat if name not in out else np.maximum(out[name], flat)
            if keep_rows:
                samples.setdefault(name, RowSample(value.shape[-1])).add(value)
    return out, {name: sample.rows() for name, sample in samples.items()}


def activation_absmax(model: onnx.ModelProto, tensors: list[str], batches: list[dict[str, np.ndarray]],
                      threads: int | None = None) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max|X| of each tensor over the batches, running the fp32 model once per batch."""
    return activation_stats(model, tensors, batches, threads)[0]


def _array(view: GraphView, name: str) -> np.ndarray:
    return numpy_helper.to_array(view.initializers[name]).astype(np.float32)


def _set(view: GraphView, name: str, array: np.ndarray) -> None:
    old = view.initializers[name]
    new = numpy_helper.from_array(array.astype(numpy_helper.to_array(old).dtype), name)
    old.CopyFrom(new)


def group_scale(view: GraphView, group: SmoothGroup, xmax: np.ndarray, alpha: float) -> np.ndarray:
    """s per input channel: max|X_j|^α / max|W_j|^(1-α), W_j the row j of every weight of the group."""
    rows = []
    for name in group.matmuls:
        node = view.by_name[name]
        weight = np.abs(_array(view, node.input[1]))
        rows.append(weight.max(axis=1 - _weight_axis(node)))
    wmax = np.max(np.stack(rows), axis=0)
    scale = np.power(np.maximum(xmax, EPS), alpha) / np.power(np.maximum(wmax, EPS), 1.0 - alpha)
    return np.maximum(scale, EPS).astype(np.float32)


def _fold(view: GraphView, group: SmoothGroup, scale: np.ndarray) -> None:
    """Divide the absorber's output channels by s (exact: see the module docstring)."""
    node = view.by_name[group.absorber or ""]
    if node.op_type in NORMS:
        for index in NORMS[node.op_type]:
            if index < len(node.input) and node.input[index]:
                _set(view, node.input[index], _array(view, node.input[index]) / scale)
        return
    axis = _weight_axis(node)
    weight = _array(view, node.input[1])
    _set(view, node.input[1], weight / (scale[:, None] if axis == 1 else scale[None, :]))
    if group.bias is not None:
        _set(view, group.bias, _array(view, group.bias) / scale)


def _insert_mul(proto: onnx.ModelProto, group: SmoothGroup, scale: np.ndarray) -> str:
    """`Mul(X, 1/s)` before the group's first MatMul; returns the Mul's name."""
    name = f"{group.matmuls[0]}_smooth_mul"
    inverse = f"{group.activation}_smooth_inverse"
    smoothed = f"{group.activation}_smoothed"
    proto.graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inverse))
    mul = onnx.helper.make_node("Mul", [group.activation, inverse], [smoothed], name=name)
    members = set(group.matmuls)
    position = next(i for i, node in enumerate(proto.graph.node) if node.name in members)
    for node in proto.graph.node:
        if node.name in members:
            node.input[0] = smoothed
    proto.graph.node.insert(position, mul)
    typed = next((v for v in proto.graph.value_info if v.name == group.activation), None)
    if typed is not None:  # the quantizer's per-tensor overrides need the type of the tensor it quantizes
        copy = proto.graph.value_info.add()
        copy.CopyFrom(typed)
        copy.name = smoothed
    return name


def _group_weights(view: GraphView, group: SmoothGroup) -> list[np.ndarray]:
    """The group's weights as [K, N] (input channels first)."""
    out = []
    for name in group.matmuls:
        node = view.by_name[name]
        weight = _array(view, node.input[1])
        out.append(weight if _weight_axis(node) == 0 else weight.T)
    return out


def _group_alpha(view: GraphView, group: SmoothGroup, xmax: np.ndarray, alpha: float | str,
                 rows: dict[str, np.ndarray]) -> tuple[float | None, dict[str, float] | None]:
    """The group's alpha: the model's, or with `per_layer` the grid's best by int8 error (None: leave it; no
    calibration rows of its input: the grid's middle, with no errors to record)."""
    if alpha != PER_LAYER:
        return float(alpha), None
    sample = rows.get(group.activation)
    if sample is None or not sample.size:
        return PER_LAYER_GRID[len(PER_LAYER_GRID) // 2], None
    scales = {a: group_scale(view, group, xmax, a) for a in PER_LAYER_GRID}
    return choose_alpha(sample, _group_weights(view, group), scales)


def smooth(proto: onnx.ModelProto, absmax: dict[str, np.ndarray], alpha: float | str, unabsorbed: str = "mul",
           min_ratio: float = OUTLIER_RATIO, rows: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Apply SmoothQuant in place to `proto` (a float model) with the measured per-channel max|X|; alpha
    `per_layer` chooses per group on the calibration `rows` (activation -> [rows, channels]).

    Returns the record of what was done: {"groups": [...], "inserted": [Mul names], "skipped": {tensor: why}}."""
    if alpha != PER_LAYER and not (isinstance(alpha, int | float) and 0.0 < alpha <= 1.0):
        raise ValueError(f"SmoothQuant alpha must lie in (0, 1] or be {PER_LAYER!r}, got {alpha!r}")
    if unabsorbed not in ("mul", "skip"):
        raise ValueError(f"unabsorbed must be 'mul' or 'skip', got {unabsorbed!r}")
    view = GraphView(proto)
    record: dict[str, Any] = {"alpha": alpha, "groups": [], "inserted": [], "skipped": {}}
    for group in find_groups(view):
        xmax = absmax.get(group.activation)
        if xmax is None:
            record["skipped"][group.activation] = "no calibration statistics"
            continue
        ratio = float(xmax.max() / max(float(np.median(xmax)), EPS))
        if ratio < min_ratio:
            record["skipped"][group.activation] = f"no outlier channels (max/median {ratio:.1f} < {min_ratio})"
            continue
        if group.absorber is None and unabsorbed == "skip":
            record["skipped"][group.activation] = "no op can absorb 1/s exactly"
            continue
        chosen, errors = _group_alpha(view, group, xmax, alpha, rows or {})
        if chosen is None:
            record["skipped"][group.activation] = f"smoothing does not lower the int8 error ({errors})"
            continue
        scale = group_scale(view, group, xmax, chosen)
        for name in group.matmuls:
            node = view.by_name[name]
            weight = _array(view, node.input[1])
            _set(view, node.input[1], weight * (scale[:, None] if _weight_axis(node) == 0 else scale[None, :]))
        if group.absorber is not None:
            _fold(view, group, scale)
        else:
            record["inserted"].append(_insert_mul(proto, group, scale))
        record["groups"].append({"activation": group.activation, "matmuls": list(group.matmuls),
                                 "absorber": group.absorber or "Mul (inserted)", "outlier_ratio": round(ratio, 2),
                                 "alpha": chosen, **({"int8_error": errors} if errors else {})})
    logger.info("SmoothQuant alpha %s: %d groups smoothed (%d with an inserted Mul), %d skipped", alpha,
                len(record["groups"]), len(record["inserted"]), len(record["skipped"]))
    return record


def config_alpha(value: Any) -> float | str:
    """A TuneConfig's alpha (extras[EXTRA_KEY]): a number, or `per_layer`."""
    return PER_LAYER if value == PER_LAYER else float(value)


def smoothable_tensors(proto: onnx.ModelProto) -> list[str]:
    """The activations whose per-channel statistics `smooth` needs."""
    return [group.activation for group in find_groups(GraphView(proto))]


def smoothed_model(opt: Any, samples: Any, alpha: float | str, root: Any,
                   threads: int | None = None) -> tuple[Any, dict[str, Any]]:
    """The pre-optimised model `opt` (an OptimizedModel) smoothed with `alpha` on the calibration `samples`,
    built once per (model, data, α) in `root` (shared by every trial of the job) and returned as an
    OptimizedModel of its own hash, so its calibration ranges are cached apart from the unsmoothed model's."""
    import dataclasses
    import hashlib
    from pathlib import Path

    from qtune.adaptors.onnxrt.model import OnnxModel, save_model
    from qtune.adaptors.onnxrt.workspace import file_lock, read_json, write_json_atomic

    label = alpha if alpha == PER_LAYER else f"{float(alpha):g}"
    key = f"{opt.source_hash[:16]}-{samples.fingerprint[:16]}-n{samples.count}-a{label}-v{SMOOTH_VERSION}"
    folder = Path(root) / key
    digest = hashlib.sha256(f"{opt.source_hash}/{key}".encode()).hexdigest()
    with file_lock(Path(root) / ".locks" / f"{key}.lock"):
        record = read_json(folder / "meta.json")
        if record is None or not (folder / "model.onnx").is_file():
            proto = opt.model.load()
            tensors = smoothable_tensors(proto)
            absmax, rows = (activation_stats(proto, tensors, list(samples.batches()), threads,
                                             keep_rows=alpha == PER_LAYER) if tensors else ({}, {}))
            record = smooth(proto, absmax, alpha, rows=rows)
            save_model(proto, folder / "model.onnx", external=bool(opt.model.external_data_files()) or None)
            write_json_atomic(folder / "meta.json", record)
    model = OnnxModel(folder / "model.onnx")
    smoothed = dataclasses.replace(opt, model=model, source_hash=digest,
                                   steps=[*opt.steps, f"smooth_quant alpha {label}"])
    return smoothed, record
