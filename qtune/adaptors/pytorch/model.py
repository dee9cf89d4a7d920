"""The model objects the PyTorch adaptor hands to the runner: fp32 (lazy graph) and quantized."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.export import Dim

from qtune.adaptors.pytorch.graph import LiftedGraph, fingerprint, lift
from qtune.spec.errors import DataError, ModelLoadError

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "long": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
MAX_DIM = 1 << 16


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise ModelLoadError(f"unsupported input dtype {name!r}; allowed: {', '.join(sorted(_DTYPES))}") from None


@dataclass
class InputSpec:
    name: str
    shape: list[int | str | None] | None
    dtype: str = "float32"


def example_inputs(specs: list[InputSpec]) -> tuple[dict[str, torch.Tensor], dict[str, dict[int, Any]]]:
    """Example tensors and `dynamic_shapes` for torch.export: dim 0 (batch) is always dynamic and
    so is every dimension written as a name; named dimensions with the same name are one Dim."""
    dims: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    dynamic: dict[str, dict[int, Any]] = {}
    for spec in specs:
        if not spec.shape:
            raise ModelLoadError(f"model input {spec.name!r} needs a shape to export the model")
        shape: list[int] = []
        dynamic[spec.name] = {}
        for axis, size in enumerate(spec.shape):
            if isinstance(size, int) and axis > 0:
                shape.append(size)
                continue
            dim_name = size if isinstance(size, str) and size else ("batch" if axis == 0 else f"{spec.name}_{axis}")
            dim_name = "".join(c if c.isalnum() else "_" for c in dim_name)
            if dim_name not in dims:
                dims[dim_name] = Dim(dim_name, min=1, max=MAX_DIM)
            dynamic[spec.name][axis] = dims[dim_name]
            shape.append(2 if axis == 0 else 8)
        dtype = torch_dtype(spec.dtype)
        tensors[spec.name] = (torch.randn(shape).to(dtype) if dtype.is_floating_point
                              else torch.ones(shape, dtype=dtype))
    return tensors, dynamic


def to_tensors(inputs: dict[str, np.ndarray], names: list[str]) -> list[torch.Tensor]:
    missing = [name for name in names if name not in inputs]
    if missing:
        raise DataError(f"batch lacks model inputs {missing}; it has {sorted(inputs)}")
    return [torch.from_numpy(np.ascontiguousarray(inputs[name])) for name in names]


def flat_outputs(result: Any) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        return [v for value in result.values() for v in flat_outputs(value)]
    if isinstance(result, list | tuple):
        return [v for value in result for v in flat_outputs(value)]
    if hasattr(result, "to_tuple"):  # transformers ModelOutput
        return flat_outputs(result.to_tuple())
    return []


@dataclass
class TorchModel:
    """An fp32 model: an eager module and/or an exported program; the lifted graph is built on
    first use (at load time when the input shapes are known, else from the first data batch)."""

    source: str
    input_names: list[str]
    module: nn.Module | None = None
    exported: torch.export.ExportedProgram | None = None
    input_specs: list[InputSpec] | None = None
    _lifted: LiftedGraph | None = field(default=None, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)
    _dtypes: dict[str, torch.dtype] | None = field(default=None, repr=False)
    _float_only: bool = field(default=False, repr=False)

    def expected_dtypes(self) -> dict[str, torch.dtype]:
        """The dtype each input must have: spec.model.inputs, else the exported program's, else (an eager
        module) the dtype of its floating-point weights for floating-point inputs."""
        if self._dtypes is None:
            dtypes: dict[str, torch.dtype] = {}
            if self.input_specs:
                dtypes = {spec.name: torch_dtype(spec.dtype) for spec in self.input_specs}
            elif self.exported is not None:
                user = [spec.arg.name for spec in self.exported.graph_signature.input_specs
                        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT]
                values = {node.name: node.meta.get("val") for node in self.exported.graph.nodes
                          if node.op == "placeholder"}
                for name, arg in zip(self.input_names, user, strict=False):
                    dtype = getattr(values.get(arg), "dtype", None)
                    if dtype is not None:
                        dtypes[name] = dtype
            elif self.module is not None:
                floating = next((p.dtype for p in self.module.parameters() if p.dtype.is_floating_point), None)
                if floating is not None:
                    dtypes = {name: floating for name in self.input_names}
                    self._float_only = True
            self._dtypes = dtypes
        return self._dtypes

    def check_batch(self, batch: dict[str, np.ndarray]) -> None:
        """DataError naming the input, its dtype and the allowed one when a batch cannot feed the model."""
        expected = self.expected_dtypes()
        for name in self.input_names:
            if name not in batch or name not in expected:
                continue
            array = np.asarray(batch[name])
            got = torch.from_numpy(np.zeros((0,), dtype=array.dtype)).dtype if array.dtype.kind in "biuf" else None
            want = expected[name]
            if got == want or (self._float_only and (got is None or not got.is_floating_point)):
                continue
            want_name = str(want).removeprefix("torch.")
            raise DataError(
                f"input {name!r} holds {array.dtype.name} data; the model takes {want_name} (allowed: {want_name}, "
                f"as spec.model.inputs[].dtype says, default float32): save the array as numpy.{want_name}"
            )

    @property
    def has_graph(self) -> bool:
        """True when the graph exists or can be built without data."""
        return self._lifted is not None or self.exported is not None or bool(self.input_specs)

    def export(self, batch: dict[str, np.ndarray] | None = None) -> torch.export.ExportedProgram:
        if self.exported is not None:
            return self.exported
        assert self.module is not None
        if batch is not None:
            self.check_batch(batch)
        if self.input_specs:
            tensors, dynamic = example_inputs(self.input_specs)
        elif batch is not None:
            specs = [InputSpec(name, ["batch", *batch[name].shape[1:]], str(batch[name].dtype))
                     for name in self.input_names]
            tensors, dynamic = example_inputs(specs)
            tensors = {name: torch.from_numpy(np.ascontiguousarray(np.concatenate([batch[name]] * 2)[:2]))
                       for name in self.input_names}
        else:
            raise ModelLoadError(
                f"{self.source}: give spec.model.inputs (name, shape, dtype) so the model can be exported"
            )
        try:
            with torch.no_grad():
                self.exported = torch.export.export(self.module.eval(), (), kwargs=tensors, dynamic_shapes=dynamic)
        except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds
            raise ModelLoadError(f"{self.source}: torch.export failed: {type(exc).__name__}: {exc}"[:1500]) from None
        return self.exported

    def lifted(self, batch: dict[str, np.ndarray] | None = None) -> LiftedGraph:
        if self._lifted is None:
            exported = self.export(batch)
            self._lifted = lift(exported, self.input_names)
            logger.info("%s: %d quantizable ops in the exported graph", self.source, len(self._lifted.ops))
        return self._lifted

    @property
    def graph(self) -> fx.GraphModule:
        return self.lifted().module

    def runnable(self, batch: dict[str, np.ndarray] | None = None) -> nn.Module:
        if batch is not None:
            self.check_batch(batch)
        return self.lifted(batch).module

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.graph, extra=",".join(self.input_names))
        return self._fingerprint


@dataclass
class QuantizedTorchModel:
    """The result of `quantize`: a converted FX GraphModule plus what produced it."""

    module: fx.GraphModule
    input_names: list[str]
    tune_cfg: dict[str, Any]
    fp32: TorchModel
    quantized_ops: list[str]
    fp32_ops: dict[str, str]  # op -> why it stayed fp32
    prepared: fx.GraphModule | None = field(default=None, repr=False)

    def runnable(self, batch: dict[str, np.ndarray] | None = None) -> nn.Module:
        if batch is not None:
            self.fp32.check_batch(batch)
        return self.module


def runnable(model: Any, batch: dict[str, np.ndarray] | None = None) -> tuple[nn.Module, list[str]]:
    if isinstance(model, TorchModel | QuantizedTorchModel):
        return model.runnable(batch), model.input_names
    raise TypeError(f"expected a TorchModel or QuantizedTorchModel, got {type(model).__name__}")
