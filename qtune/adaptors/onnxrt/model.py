"""The ONNX model handle: a path to a .onnx file on disk plus the external data files it references.

Models are passed around as paths, never as in-memory protos: a >2 GB model cannot be serialised
as one protobuf, ONNX Runtime loads faster from a path, and a path travels between processes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from qtune.spec.errors import ModelLoadError

logger = logging.getLogger(__name__)

TWO_GB = 2**31
"""Protobuf's hard limit: bigger models must keep their weights in external data."""

DEFAULT_OPSET_DOMAINS = ("", "ai.onnx")


@dataclass
class OnnxModel:
    """A .onnx file (and the external data next to it). Cheap to copy and pickle."""

    path: Path
    _hash: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path).resolve()

    # --- reading ---------------------------------------------------------------------------
    def load(self, load_external_data: bool = True) -> onnx.ModelProto:
        """The ModelProto; with load_external_data the weights are read into it (in memory)."""
        return onnx.load(str(self.path), load_external_data=load_external_data)

    def graph_only(self) -> onnx.ModelProto:
        """The ModelProto without reading external weights: fast for inspecting structure."""
        return self.load(load_external_data=False)

    def external_data_files(self) -> list[Path]:
        """External data files referenced by the model's tensors (absolute, existing or not)."""
        proto = self.graph_only()
        locations: set[str] = set()
        for tensor in _all_tensors(proto.graph):
            if external_data_helper.uses_external_data(tensor):
                info = external_data_helper.ExternalDataInfo(tensor)
                locations.add(info.location)
        return [self.path.parent / location for location in sorted(locations)]

    def files(self) -> list[Path]:
        return [self.path, *self.external_data_files()]

    @property
    def size(self) -> int:
        """Bytes on disk: the .onnx plus its external data."""
        return sum(path.stat().st_size for path in self.files() if path.exists())

    def input_names(self) -> list[str]:
        proto = self.graph_only()
        initializers = {init.name for init in proto.graph.initializer}
        return [value.name for value in proto.graph.input if value.name not in initializers]

    def output_names(self) -> list[str]:
        return [value.name for value in self.graph_only().graph.output]

    @property
    def opset(self) -> int:
        return opset_of(self.graph_only())

    def hash(self) -> str:
        """sha256 of the model file and its external data (cached on the handle)."""
        if self._hash is None:
            digest = hashlib.sha256()
            for path in self.files():
                digest.update(path.name.encode())
                with path.open("rb") as handle:
                    for chunk in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(chunk)
            self._hash = digest.hexdigest()
        return self._hash

    # --- writing ---------------------------------------------------------------------------
    def copy_to(self, destination: Path) -> OnnxModel:
        """Copy the model file and its external data files (same relative locations)."""
        destination = Path(destination).resolve()
        destination.parent.mkdir(parents=True, exist_ok=True)
        for data_file in self.external_data_files():
            relative = data_file.relative_to(self.path.parent)
            target = destination.parent / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if data_file.resolve() != target.resolve():
                shutil.copyfile(data_file, target)
        if self.path != destination:
            shutil.copyfile(self.path, destination)
        return OnnxModel(destination)


def _all_tensors(graph: onnx.GraphProto):
    """Every TensorProto of a graph: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_tensors(subgraph)


def opset_of(proto: onnx.ModelProto) -> int:
    for opset in proto.opset_import:
        if opset.domain in DEFAULT_OPSET_DOMAINS:
            return int(opset.version)
    return 0


def save_model(proto: onnx.ModelProto, path: Path, external: bool | None = None) -> OnnxModel:
    """Save `proto` to `path`. Weights go to `<name>.data` when `external` is True, or when None
    and the model is near the 2 GB protobuf limit. Returns the handle of the saved file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external is None:
        external = proto.ByteSize() > TWO_GB - (64 << 20) if _safe_byte_size(proto) else True
    data_name = f"{path.name}.data"
    data_path = path.parent / data_name
    if data_path.exists():
        data_path.unlink()  # onnx appends to an existing data file
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    return OnnxModel(path)


def _safe_byte_size(proto: onnx.ModelProto) -> bool:
    try:
        proto.ByteSize()
    except Exception:  # noqa: BLE001 - protobuf raises various errors past 2 GB
        return False
    return True


def load_onnx_model(path: str | os.PathLike[str]) -> OnnxModel:
    """Open and validate a model file; every failure is a one-line ModelLoadError."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"model path is not a file: {path}")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"model file {path} is empty")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(f"model file {path} is not a valid ONNX protobuf: {_one_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - protobuf may raise anything on garbage
        raise ModelLoadError(f"model file {path} is not a valid ONNX protobuf: {_one_line(exc)}") from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise ModelLoadError(f"model file {path} is not an ONNX model (no graph)")
    if proto.ir_version <= 0:
        raise ModelLoadError(f"model file {path} is not an ONNX model (no IR version)")
    model = OnnxModel(path)
    missing = [str(p.name) for p in model.external_data_files() if not p.is_file()]
    if missing:
        raise ModelLoadError(f"model file {path} references missing external data file(s): {', '.join(missing)}")
    try:
        # The path form checks models with external data and models over 2 GB.
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - checker raises ValidationError and others
        raise ModelLoadError(f"model file {path} fails onnx.checker: {_one_line(exc)}") from None
    return model


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first[:300]
