"""A qtune tune config (plain dict) -> torch FX `QConfigMapping` for the x86 backend."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.ao.nn.quantized import dynamic as nnqd
from torch.ao.quantization import QConfig, QConfigMapping
from torch.ao.quantization.observer import (
    HistogramObserver,
    MinMaxObserver,
    PerChannelMinMaxObserver,
    PlaceholderObserver,
)

logger = logging.getLogger(__name__)

OBSERVERS = {"minmax": MinMaxObserver, "kl": HistogramObserver}
"""Static activation observer per qtune algorithm (see capability.py for the honest mapping)."""


@dataclass(frozen=True)
class OpChoice:
    name: str
    op_type: str
    quantized: bool
    activation: dict[str, Any]
    weight: dict[str, Any]


def op_choices(tune_cfg: dict[str, Any]) -> dict[str, OpChoice]:
    """Per op: quantized or fp32. An op whose activation or weight is fp32 stays fp32 as a whole:
    torch's CPU kernels have no fast int8-weight x fp32-activation path."""
    choices = {}
    for name, op in (tune_cfg.get("ops") or {}).items():
        activation = op.get("activation") or {"dtype": "fp32"}
        weight = op.get("weight") or {"dtype": "fp32"}
        quantized = activation.get("dtype") != "fp32" and weight.get("dtype") != "fp32"
        if activation.get("dtype") != weight.get("dtype") and "fp32" in (activation.get("dtype"), weight.get("dtype")):
            logger.info("%s: only one of activation/weight is int8; torch has no such kernel, keeping fp32", name)
        choices[name] = OpChoice(name, op.get("op_type", ""), quantized, activation, weight)
    return choices


def _weight_observer(weight: dict[str, Any]) -> Any:
    quant_min, quant_max = (-64, 63) if weight.get("reduce_range") else (-128, 127)
    if weight.get("granularity", "per_channel") == "per_channel":
        return PerChannelMinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0, quant_min=quant_min, quant_max=quant_max
        )
    return MinMaxObserver.with_args(
        dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=quant_min, quant_max=quant_max
    )


def _activation_range(activation: dict[str, Any]) -> tuple[int, int]:
    return (0, 127) if activation.get("reduce_range") else (0, 255)


def static_qconfig(activation: dict[str, Any], weight: dict[str, Any]) -> QConfig:
    algorithm = activation.get("algorithm") or "minmax"
    if algorithm not in OBSERVERS:
        raise ValueError(f"calibration algorithm {algorithm!r} is not available in torch; allowed: "
                         f"{', '.join(OBSERVERS)}")
    qscheme = torch.per_tensor_symmetric if activation.get("scheme") == "sym" else torch.per_tensor_affine
    quant_min, quant_max = _activation_range(activation)
    observer = OBSERVERS[algorithm].with_args(dtype=torch.quint8, qscheme=qscheme,
                                              quant_min=quant_min, quant_max=quant_max)
    return QConfig(activation=observer, weight=_weight_observer(weight))


def dynamic_qconfig(weight: dict[str, Any]) -> QConfig:
    observer = PlaceholderObserver.with_args(dtype=torch.quint8, quant_min=0, quant_max=255, is_dynamic=True)
    return QConfig(activation=observer, weight=_weight_observer(weight))


def calibration_qconfig(algorithm: str) -> QConfig:
    """The qconfig used once per (model, data, algorithm) to record activation statistics of every
    tensor any static config can observe. Min/max and the histogram do not depend on scheme or
    reduce_range, so one run serves every static config using `algorithm`."""
    return static_qconfig({"algorithm": algorithm}, {"granularity": "per_tensor"})


def qconfig_mapping(tune_cfg: dict[str, Any], op_types: dict[str, str],
                    force_fp32: set[str] | None = None) -> QConfigMapping:
    """Global None (everything fp32) plus one qconfig per quantized op, by module name."""
    approach = tune_cfg.get("approach", "static")
    mapping = QConfigMapping().set_global(None)  # type: ignore[arg-type]
    for name, choice in op_choices(tune_cfg).items():
        if name not in op_types:
            logger.debug("tune config op %s is not in this graph; ignored", name)
            continue
        if not choice.quantized or name in (force_fp32 or set()):
            continue
        if approach == "dynamic":
            if op_types[name] != "Linear":
                logger.info("%s (%s): no dynamic int8 kernel in torch; kept fp32", name, op_types[name])
                continue
            mapping.set_module_name(name, dynamic_qconfig(choice.weight))
        else:
            mapping.set_module_name(name, static_qconfig(choice.activation, choice.weight))
    return mapping


class DynamicLinear(nnqd.Linear):
    """`nn.quantized.dynamic.Linear` whose activation range follows the tune config: torch's own
    module always passes reduce_range=True (7-bit activations, a precaution for CPUs without VNNI)."""

    qtune_reduce_range = False  # no annotation: TorchScript cannot read postponed annotations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params,
                                               reduce_range=self.qtune_reduce_range)
        return y.to(x.dtype)

    def _get_name(self) -> str:
        return "QtuneDynamicQuantizedLinear"


def apply_dynamic_reduce_range(model: torch.nn.Module, tune_cfg: dict[str, Any]) -> None:
    """Switch each converted dynamic Linear to DynamicLinear with the op's reduce_range."""
    choices = op_choices(tune_cfg)
    for name, module in model.named_modules():
        if type(module) is nnqd.Linear and name in choices:
            module.__class__ = DynamicLinear
            module.qtune_reduce_range = bool(choices[name].activation.get("reduce_range", False))
