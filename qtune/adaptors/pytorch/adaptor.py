"""The PyTorch adaptor: torch.export + FX graph-mode quantization, x86 backend (see README.md)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qtune.adaptors.base import Adaptor, LatencyStats, adaptor_registry
from qtune.adaptors.pytorch import export, runtime
from qtune.adaptors.pytorch.capability import build_capability, fused_patterns
from qtune.adaptors.pytorch.graph import QUANTIZABLE_TYPES, OpInfo
from qtune.adaptors.pytorch.loading import load_model
from qtune.adaptors.pytorch.model import QuantizedTorchModel, TorchModel
from qtune.adaptors.pytorch.quantize import Quantizer
from qtune.adaptors.pytorch.sensitivity import op_sensitivity
from qtune.data import DataLoader, Dataset, Metric

logger = logging.getLogger(__name__)

_FUSABLE_NEIGHBOURS = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "ReLU")


@adaptor_registry
class PyTorchAdaptor(Adaptor):
    name = "pytorch"

    def __init__(self, framework_specific_info: dict[str, Any]) -> None:
        super().__init__(framework_specific_info)
        quantization = self.info.get("quantization") or {}
        keep = quantization.get("keep_non_finite_fp32", quantization.get("keepNonFiniteFp32", True))
        self._quantizer = Quantizer(self.workspace, keep_non_finite_fp32=bool(keep))
        self._threads: int | None = self.info.get("threads")

    # --- model I/O ------------------------------------------------------------------------
    def load_model(self, model_spec: dict[str, Any]) -> TorchModel:
        job_dir = Path(self.info["job_dir"]) if self.info.get("job_dir") else None
        return load_model(model_spec, job_dir, self.info.get("inputs"))

    def save_model(self, model: Any, path: Path) -> Path:
        return export.save(_check(model), Path(path))

    def export_onnx(self, model: Any, path: Path) -> Path:
        """ONNX of an fp32 model, or the QDQ ONNX of a static int8 model."""
        return export.export_onnx(_check(model), Path(path))

    def model_size(self, model: Any) -> int:
        return export.size(_check(model))

    def input_names(self, model: Any) -> list[str]:
        return list(_check(model).input_names)

    # --- capability ------------------------------------------------------------------------
    def query_fw_capability(self, model: Any) -> dict[str, Any]:
        fp32 = _fp32(model)
        if not fp32.has_graph:
            ops = module_ops(fp32)
            note = ("op order is the module registration order: the model is exported from the first "
                    "calibration batch; give spec.model.inputs to get the graph order")
            return build_capability(ops, {op.name: note for op in ops[:1]})
        lifted = fp32.lifted()
        return build_capability(lifted.ops, lifted.not_lifted)

    def query_fused_patterns(self, model: Any) -> list[list[str]]:
        fp32 = _fp32(model)
        if fp32.has_graph:
            lifted = fp32.lifted()
            present = {op.op_type for op in lifted.ops}
            modules = lifted.module.modules()
        else:
            present = {op.op_type for op in module_ops(fp32)}
            modules = fp32.module.modules() if fp32.module is not None else iter(())
        for module in modules:
            if type(module).__name__ in _FUSABLE_NEIGHBOURS:
                present.add(type(module).__name__)
        return fused_patterns(present)

    # --- quantization ------------------------------------------------------------------------
    def quantize(self, tune_cfg: dict[str, Any], model: Any, dataloader: DataLoader,
                 q_func: Any = None) -> QuantizedTorchModel:
        if q_func is not None:
            raise ValueError("quantization-aware training (q_func) is not supported by the pytorch adaptor")
        quantized = self._quantizer.quantize(tune_cfg, _fp32(model), dataloader)
        self.timings = dict(self._quantizer.timings)
        return quantized

    @property
    def range_problems(self) -> dict[str, str]:
        """Ops kept fp32 because their calibration range was non-finite or absurd, with the reason."""
        return dict(self._quantizer.range_problems)

    # --- running -------------------------------------------------------------------------------
    def evaluate(self, model: Any, dataloader: DataLoader, postprocess: Any = None,
                 metric: Metric | None = None, measurer: Any = None, iteration: int = -1,
                 tensorboard: bool = False) -> float:
        return runtime.evaluate(_check(model), dataloader, metric, postprocess, self.info.get("output"),
                                iteration, self._threads)

    def run(self, model: Any, inputs: dict[str, Any]) -> list[Any]:
        with runtime.threads(self._threads):
            return runtime.run(_check(model), {name: np.asarray(value) for name, value in inputs.items()})

    def predict(self, model: Any, dataloader: DataLoader, output: str | int | None = None) -> np.ndarray:
        return runtime.predict(_check(model), dataloader,
                               output if output is not None else self.info.get("output"), self._threads)

    def benchmark(self, model: Any, inputs: dict[str, Any], warmup: int, runs: int, threads: int) -> LatencyStats:
        return runtime.benchmark(_check(model), inputs, warmup, runs, threads)

    def make_runner(self, model: Any, inputs: dict[str, Any], threads: int) -> Callable[[], None]:
        return runtime.make_runner(_check(model), inputs, threads)

    def op_sensitivity(self, model: Any, tune_cfg: dict[str, Any], dataset: Dataset) -> dict[str, float]:
        samples = dataset.take(min(16, int(tune_cfg.get("calibration_sampling_size") or 16)))
        with runtime.threads(self._threads):
            return op_sensitivity(_fp32(model), tune_cfg, samples.inputs)


def module_ops(model: TorchModel) -> list[OpInfo]:
    """Quantizable ops from the module tree, for a model not exported yet (same names as the graph's)."""
    if model.module is None:
        return []
    return [OpInfo(name, type(module).__name__, tuple(module.weight.shape))
            for name, module in model.module.named_modules()
            if type(module).__name__ in QUANTIZABLE_TYPES and isinstance(module, torch.nn.Module)]


def _check(model: Any) -> TorchModel | QuantizedTorchModel:
    if isinstance(model, TorchModel | QuantizedTorchModel):
        return model
    raise TypeError(f"expected a model loaded by the pytorch adaptor, got {type(model).__name__}")


def _fp32(model: Any) -> TorchModel:
    if isinstance(model, QuantizedTorchModel):
        return model.fp32
    if isinstance(model, TorchModel):
        return model
    raise TypeError(f"expected a model loaded by the pytorch adaptor, got {type(model).__name__}")
