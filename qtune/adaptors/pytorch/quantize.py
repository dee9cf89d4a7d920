"""Calibrate (cached) and convert one tune config with FX graph-mode quantization, x86 backend."""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from qtune.adaptors.pytorch import calibration as calib
from qtune.adaptors.pytorch.model import QuantizedTorchModel, TorchModel, to_tensors
from qtune.adaptors.pytorch.qconfig import DynamicLinear, apply_dynamic_reduce_range, op_choices, qconfig_mapping

logger = logging.getLogger(__name__)

_QUANTIZED_MODULE_PREFIXES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")


def x86_backend_config() -> Any:
    import torch.ao.quantization.backend_config.utils  # noqa: F401 - x86.py needs it imported first
    from torch.ao.quantization.backend_config.x86 import get_x86_backend_config

    torch.backends.quantized.engine = "x86"
    return get_x86_backend_config()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch.ao.quantization warns about its own deprecation on every call (see README.md)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*TorchScript type system doesn't support instance-level.*")
        yield


def first_batch(dataloader: Iterable[Any]) -> dict[str, np.ndarray]:
    for inputs, _labels in dataloader:
        return inputs
    raise ValueError("the calibration data is empty")


def is_quantized_module(module: torch.nn.Module) -> bool:
    return type(module).__module__.startswith(_QUANTIZED_MODULE_PREFIXES) or isinstance(module, DynamicLinear)


def quantized_op_names(converted: fx.GraphModule, op_names: Iterable[str]) -> list[str]:
    modules = dict(converted.named_modules())
    return [name for name in op_names if name in modules and is_quantized_module(modules[name])]


class Quantizer:
    """One per adaptor: holds the calibration cache of the job."""

    def __init__(self, workspace: Path, keep_non_finite_fp32: bool = True) -> None:
        self.folder = workspace / "calibration"
        self.keep_non_finite_fp32 = keep_non_finite_fp32
        self.backend_config = x86_backend_config()
        self.timings: dict[str, float] = {}
        self.range_problems: dict[str, str] = {}

    def statistics(self, fp32: TorchModel, algorithms: set[str], batches: list[dict[str, np.ndarray]],
                   samples: int) -> tuple[dict[str, Any], float]:
        """Statistics per algorithm, from the cache or computed (and cached) now."""
        lifted = fp32.lifted()
        cache = calib.CalibrationCache(self.folder, fp32.fingerprint(),
                                       f"{calib.data_fingerprint(batches)}-n{samples}")
        result: dict[str, Any] = {}
        seconds = 0.0
        for algorithm in sorted(algorithms):
            cached = cache.get(algorithm)
            if cached is None:
                started = time.perf_counter()
                example = tuple(to_tensors(batches[0], fp32.input_names))
                with quiet():
                    cached = calib.collect(lifted.module, [op.name for op in lifted.ops], algorithm, example,
                                           batches, fp32.input_names, self.backend_config)
                cache.put(algorithm, cached)
                seconds += time.perf_counter() - started
                logger.info("calibrated %s on %d samples in %.2fs (cached in %s)", algorithm, samples,
                            time.perf_counter() - started, cache.path(algorithm))
            result[algorithm] = cached
        return result, seconds

    def quantize(self, tune_cfg: dict[str, Any], fp32: TorchModel, dataloader: Iterable[Any]) -> QuantizedTorchModel:
        started = time.perf_counter()
        batch = first_batch(dataloader)
        lifted = fp32.lifted(batch)
        op_types = {op.name: op.op_type for op in lifted.ops}
        approach = tune_cfg.get("approach", "static")
        choices = op_choices(tune_cfg)
        fp32_ops: dict[str, str] = {name: "fp32 in the tune config" for name, c in choices.items()
                                    if not c.quantized and name in op_types}
        force: set[str] = set()
        calibration_seconds = 0.0
        stats: dict[str, Any] = {}
        if approach == "static":
            algorithms = {c.activation.get("algorithm") or "minmax" for c in choices.values()
                          if c.quantized and c.name in op_types}
            samples = int(tune_cfg.get("calibration_sampling_size") or 100)
            batches = calib.calibration_batches(dataloader, samples)
            if algorithms:
                stats, calibration_seconds = self.statistics(fp32, algorithms, batches, samples)
            if self.keep_non_finite_fp32:
                for algorithm, recorded in stats.items():
                    for node, (low, high) in calib.absurd_ranges(recorded["stats"]).items():
                        for op in recorded["ops"].get(node, []):
                            if op not in force and choices.get(op) is not None and choices[op].quantized:
                                reason = f"calibration range of {node} is [{low:.3g}, {high:.3g}] ({algorithm})"
                                self.range_problems[op] = reason
                                fp32_ops[op] = reason + ": kept fp32"
                                logger.warning("%s: %s; keeping it fp32 (quantization.keepNonFiniteFp32)", op, reason)
                            force.add(op)
        mapping = qconfig_mapping(tune_cfg, op_types, force)
        example = tuple(to_tensors(batch, fp32.input_names))
        with quiet():
            prepared = prepare_fx(copy.deepcopy(lifted.module), mapping, example, backend_config=self.backend_config)
            if approach == "static" and stats:
                missing = calib.load_into(prepared, {a: s["stats"] for a, s in stats.items()})
                if missing:
                    logger.warning("no cached statistics for %s; calibrating this config directly", missing[:5])
                    phase = time.perf_counter()
                    with torch.inference_mode():
                        for calibration_batch in calib.calibration_batches(dataloader, samples):
                            prepared(*to_tensors(calibration_batch, fp32.input_names))
                    calibration_seconds += time.perf_counter() - phase
            kept = copy.deepcopy(prepared) if approach == "static" else None  # for the QDQ ONNX export
            converted = convert_fx(prepared, backend_config=self.backend_config)
        if approach == "dynamic":
            apply_dynamic_reduce_range(converted, tune_cfg)
        converted.eval()
        quantized = quantized_op_names(converted, op_types)
        for name in op_types:
            if name not in quantized and name not in fp32_ops:
                fp32_ops[name] = "not converted by torch (no int8 kernel for this op and approach)"
        self.timings = {"calibration": round(calibration_seconds, 4),
                        "quantize": round(time.perf_counter() - started - calibration_seconds, 4)}
        logger.info("%s int8: %d of %d ops quantized (calibration %.2fs, quantize %.2fs)", approach,
                    len(quantized), len(op_types), self.timings["calibration"], self.timings["quantize"])
        return QuantizedTorchModel(converted, list(fp32.input_names), dict(tune_cfg), fp32, quantized, fp32_ops,
                                   prepared=kept)
