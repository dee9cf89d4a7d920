"""fp32 pre-optimisation before quantization, cached per job in `<workspace>/optimized/<model hash>/`.

Steps, each logged and recorded in the folder's meta.json:
1. opset < 13 → `onnx.version_converter` to 13 (per-channel static QDQ needs opset 13; if the
   conversion fails the model keeps its opset and weights are offered per_tensor only);
2. a graph with attention blocks (MatMul → [Div|Mul] → [Add] → Softmax → MatMul) → ONNX Runtime's
   transformer optimizer (model_type bert, heads/hidden size detected), which fuses Attention,
   SkipLayerNormalization, Gelu...: much faster in fp32 and int8;
3. ORT's `quant_pre_process` (symbolic shape inference, ORT basic graph optimisation, ONNX shape
   inference), retried with `skip_symbolic_shape=True` when symbolic inference fails, and run in
   a temporary working folder because it leaves large files in the current directory on failure;
   (and, should ORT's optimisation itself fail, once more as shape inference only);
4. every node gets a unique name (ORT's quantizer addresses nodes by name);
5. Gemm biases of shape [1, N] become [N] (ORT's per-channel int32 bias check needs the 1-D form);
6. a constant scale (and shift) right after a Conv is folded into its weights (`fold.py`): quantized, the
   Conv's int8 output then goes on without a DequantizeLinear and two fp32 elementwise passes;
7. a division by a constant becomes a multiplication by its reciprocal (`reciprocal.py`): ORT has int8 Mul
   and no int8 Div, so a hard-swish `x * clip(x + 3, 0, 6) / 6` can then run int8 between two int8 Convs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from qtune.adaptors.onnxrt.fold import fold_conv_affine
from qtune.adaptors.onnxrt.graph import GraphView, ensure_node_names
from qtune.adaptors.onnxrt.model import TWO_GB, OnnxModel, opset_of, save_model
from qtune.adaptors.onnxrt.reciprocal import divisions_as_multiplications
from qtune.adaptors.onnxrt.workspace import file_lock, new_staging_dir, publish_dir, read_json, write_json_atomic

logger = logging.getLogger(__name__)

MIN_PER_CHANNEL_OPSET = 13
OPTIMIZER_VERSION = 4
"""Bump when the optimisation steps change, so cached optimised models are rebuilt."""

_CHDIR_LOCK = threading.Lock()
ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention"}


@dataclass
class OptimizedModel:
    model: OnnxModel
    source_hash: str
    opset_from: int
    opset_to: int
    per_channel: bool
    transformer: dict[str, int] | None
    steps: list[str]
    notes: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_meta(self) -> dict[str, Any]:
        return {
            "version": OPTIMIZER_VERSION,
            "source_hash": self.source_hash,
            "opset_from": self.opset_from,
            "opset_to": self.opset_to,
            "per_channel": self.per_channel,
            "transformer": self.transformer,
            "steps": self.steps,
            "notes": self.notes,
            "seconds": self.seconds,
        }

    @classmethod
    def from_meta(cls, folder: Path, meta: dict[str, Any]) -> OptimizedModel:
        model = OnnxModel(folder / "model.onnx")
        return cls(model=model, source_hash=meta["source_hash"], opset_from=meta["opset_from"],
                   opset_to=meta["opset_to"], per_channel=meta["per_channel"],
                   transformer=meta.get("transformer"), steps=list(meta.get("steps", [])),
                   notes=dict(meta.get("notes", {})), seconds=float(meta.get("seconds", 0.0)))


def has_attention_blocks(proto: onnx.ModelProto) -> bool:
    """True when the graph has an unfused attention block: Softmax fed (through at most a scale,
    a mask Add/Where and Casts) by a MatMul and feeding (through Dropout/Cast) a MatMul."""
    view = GraphView(proto)
    if any(node.op_type in ATTENTION_OPS for node in view.nodes):
        return False  # already fused
    passthrough_in = {"Div", "Mul", "Add", "Where", "Cast", "Sub"}
    passthrough_out = {"Dropout", "Cast", "Identity"}
    for node in view.nodes:
        if node.op_type != "Softmax":
            continue
        frontier, from_matmul = [node.input[0]], False
        for _ in range(4):
            upstream_tensors = []
            for tensor in frontier:
                producer = view.producer.get(tensor)
                if producer is None:
                    continue
                if producer.op_type == "MatMul":
                    from_matmul = True
                elif producer.op_type in passthrough_in:
                    upstream_tensors.extend(name for name in producer.input if name)
            frontier = upstream_tensors
        if not from_matmul:
            continue
        frontier, found = [node.output[0]], False
        for _ in range(3):
            next_frontier = []
            for tensor in frontier:
                for consumer in view.consumers.get(tensor, []):
                    if consumer.op_type == "MatMul":
                        found = True
                    elif consumer.op_type in passthrough_out:
                        next_frontier.extend(consumer.output[:1])
            frontier = next_frontier
        if found:
            return True
    return False


def flatten_gemm_biases(proto: onnx.ModelProto) -> int:
    """Gemm biases of shape [1, N] → [N] (same broadcast). ORT's int32 bias check indexes the bias
    per output channel and fails on the 2-D form when weights are per-channel."""
    from onnx import numpy_helper

    view = GraphView(proto)
    changed = 0
    for name, initializer in view.initializers.items():
        consumers = view.consumers.get(name, [])
        if (len(initializer.dims) == 2 and initializer.dims[0] == 1 and consumers
                and all(node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] == name
                        and name not in node.input[:2] for node in consumers)):
            flat = numpy_helper.from_array(numpy_helper.to_array(initializer).reshape(-1), name)
            initializer.CopyFrom(flat)
            changed += 1
    if changed:
        names = {init.name for init in proto.graph.initializer}
        kept = [value for value in proto.graph.value_info if value.name not in names]
        del proto.graph.value_info[:]
        proto.graph.value_info.extend(kept)
    return changed


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    """chdir for the duration (process-wide, so serialised by a lock) and always restore."""
    with _CHDIR_LOCK:
        previous = os.getcwd()
        os.chdir(path)
        try:
            yield
        finally:
            os.chdir(previous)


def _pre_process(source: Path, target: Path, skip_optimization: bool, external: bool,
                 steps: list[str], notes: dict[str, str]) -> Path:
    """ORT's quant_pre_process in a private temporary folder; returns the path to use next."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    attempts = [(False, skip_optimization), (True, skip_optimization)]  # (skip_symbolic_shape, skip_optimization)
    if not skip_optimization:
        attempts.append((True, True))
    last_error: Exception | None = None
    for skip_symbolic, skip_opt in attempts:
        with tempfile.TemporaryDirectory(prefix="qtune-preprocess-") as tmp:
            tmp_path = Path(tmp)
            output = tmp_path / "preprocessed.onnx"
            try:
                with _working_directory(tmp_path):
                    quant_pre_process(
                        str(source), str(output),
                        skip_optimization=skip_opt,
                        skip_symbolic_shape=skip_symbolic,
                        save_as_external_data=external,
                        all_tensors_to_one_file=True,
                        external_data_location="preprocessed.onnx.data" if external else None,
                    )
                proto = onnx.load(str(output))
                save_model(proto, target, external=external or None)
                steps.append("quant_pre_process" + (" (skip_symbolic_shape)" if skip_symbolic else "")
                             + (" (shape inference only)" if skip_opt else ""))
                if last_error is not None:
                    notes["<model>:preprocess"] = (
                        f"quant_pre_process failed ({_one_line(last_error)}); retried with "
                        f"skip_symbolic_shape={skip_symbolic}, skip_optimization={skip_opt}"
                    )
                    logger.warning("%s", notes["<model>:preprocess"])
                return target
            except Exception as exc:  # noqa: BLE001 - ORT raises many kinds here
                last_error = exc
                logger.info("quant_pre_process (skip_symbolic_shape=%s, skip_optimization=%s) failed: %s",
                            skip_symbolic, skip_opt, _one_line(exc))
    notes["<model>:preprocess"] = (f"ORT pre-processing failed, quantizing the unprocessed graph: "
                                   f"{_one_line(last_error)}")
    logger.warning(notes["<model>:preprocess"])
    return source


def _one_line(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


def _build(source: OnnxModel, source_hash: str, folder: Path) -> OptimizedModel:
    started = time.perf_counter()
    steps: list[str] = []
    notes: dict[str, str] = {}
    proto = source.load()
    external = bool(source.external_data_files()) or source.size > TWO_GB - (64 << 20)
    opset_from = opset_of(proto)
    per_channel = True
    if 0 < opset_from < MIN_PER_CHANNEL_OPSET:
        try:
            proto = onnx.version_converter.convert_version(proto, MIN_PER_CHANNEL_OPSET)
            steps.append(f"version_converter opset {opset_from} -> {MIN_PER_CHANNEL_OPSET}")
            logger.info("converted opset %d -> %d (per-channel static QDQ needs opset >= 13)",
                        opset_from, MIN_PER_CHANNEL_OPSET)
        except Exception as exc:  # noqa: BLE001
            per_channel = False
            notes["<model>:opset"] = (f"opset {opset_from} < 13 and onnx.version_converter failed "
                                f"({_one_line(exc)}): weights are offered per_tensor only")
            logger.warning(notes["<model>:opset"])
    transformer: dict[str, int] | None = None
    with tempfile.TemporaryDirectory(prefix="qtune-optimize-") as tmp:
        work = Path(tmp)
        current = save_model(proto, work / "input.onnx", external=external or None).path
        del proto
        is_transformer = has_attention_blocks(onnx.load(str(current), load_external_data=False))
        if is_transformer:
            try:
                from onnxruntime.transformers.optimizer import optimize_model

                with _working_directory(work):
                    optimized = optimize_model(str(current), model_type="bert", num_heads=0, hidden_size=0)
                transformer = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
                fused = work / "transformer.onnx"
                optimized.save_model_to_file(str(fused), use_external_data_format=external)
                current = fused
                steps.append(f"transformer optimizer (bert): {transformer}")
                logger.info("transformer optimizer fused %s", transformer)
            except Exception as exc:  # noqa: BLE001
                notes["<model>:transformer"] = f"transformer optimizer failed, continuing unfused: {_one_line(exc)}"
                logger.warning(notes["<model>:transformer"])
        current = _pre_process(current, work / "preprocessed.onnx", skip_optimization=is_transformer,
                               external=external, steps=steps, notes=notes)
        final_proto = onnx.load(str(current))
    renamed = ensure_node_names(final_proto)
    if renamed:
        steps.append(f"named {renamed} unnamed nodes")
    flattened = flatten_gemm_biases(final_proto)
    if flattened:
        steps.append(f"reshaped {flattened} Gemm bias(es) [1, N] -> [N]")
    folded = fold_conv_affine(final_proto)
    if folded:
        steps.append(f"folded the constant scale/shift after {folded} Conv(s) into their weights")
    divisions = divisions_as_multiplications(final_proto)
    if divisions:
        steps.append(f"rewrote {divisions} division(s) by a constant as multiplications by its reciprocal")
    model = save_model(final_proto, folder / "model.onnx", external=external or None)
    seconds = time.perf_counter() - started
    return OptimizedModel(model=model, source_hash=source_hash, opset_from=opset_from,
                          opset_to=opset_of(final_proto), per_channel=per_channel,
                          transformer=transformer, steps=steps, notes=notes, seconds=seconds)


def optimize(source: OnnxModel, source_hash: str, root: Path) -> OptimizedModel:
    """The optimised model of `source`, built once per (model hash) and shared by all processes."""
    key = f"{source_hash[:32]}-v{OPTIMIZER_VERSION}"
    folder = root / key
    meta = read_json(folder / "meta.json")
    if meta is not None:
        return OptimizedModel.from_meta(folder, meta)
    with file_lock(root / f"{key}.lock"):
        meta = read_json(folder / "meta.json")
        if meta is not None:
            return OptimizedModel.from_meta(folder, meta)
        staging = new_staging_dir(root, key)
        try:
            result = _build(source, source_hash, staging)
            write_json_atomic(staging / "meta.json", result.to_meta())
            publish_dir(staging, folder)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        logger.info("optimised %s in %.2fs: %s", source.path.name, result.seconds, "; ".join(result.steps))
        return OptimizedModel.from_meta(folder, read_json(folder / "meta.json") or result.to_meta())
