"""Cheap per-op sensitivity: one fp32 pass with hooks, no trial per op.

For each quantizable module, the recorded fp32 input and the module's weight are fake-quantized as
the tune config says (activation with the range observed on the same samples, weight per channel
or per tensor, symmetric int8), the module is re-run on them alone, and the relative MSE against
its fp32 output is the score: ||y_q - y||^2 / ||y||^2. Ops in fp32 in the config score 0.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from qtune.adaptors.pytorch.model import TorchModel, to_tensors
from qtune.adaptors.pytorch.qconfig import op_choices

logger = logging.getLogger(__name__)


def _fake_quant_activation(x: torch.Tensor, activation: dict[str, Any]) -> torch.Tensor:
    """Min-max range of this batch: the dynamic range, and for static a close stand-in (the
    samples are calibration samples)."""
    levels = 127 if activation.get("reduce_range") else 255
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if activation.get("scheme") == "sym":
        bound = max(abs(low), abs(high))
        low, high = -bound, bound
    if not (np.isfinite(low) and np.isfinite(high)) or high - low <= 0:
        return x
    scale = (high - low) / levels
    zero_point = int(round(-low / scale))
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, levels)


def _fake_quant_weight(w: torch.Tensor, weight: dict[str, Any]) -> torch.Tensor:
    bound = 63 if weight.get("reduce_range") else 127
    if weight.get("granularity", "per_channel") == "per_channel":
        amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1).clamp(min=1e-12)
        scale = (amax / bound).float()
        zero = torch.zeros(w.shape[0], dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -bound - 1, bound)
    scale = max(float(w.detach().abs().max()), 1e-12) / bound
    return torch.fake_quantize_per_tensor_affine(w, scale, 0, -bound - 1, bound)


def op_sensitivity(model: TorchModel, tune_cfg: dict[str, Any], inputs: dict[str, np.ndarray]) -> dict[str, float]:
    lifted = model.lifted(inputs)
    graph = lifted.module
    modules = dict(graph.named_modules())
    choices = op_choices(tune_cfg)
    records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    handles = []
    for op in lifted.ops:
        module = modules.get(op.name)
        if module is None:
            continue

        def hook(mod: nn.Module, args: tuple[Any, ...], output: torch.Tensor, name: str = op.name) -> None:
            records.setdefault(name, []).append((args[0].detach(), output.detach()))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            graph(*to_tensors(inputs, model.input_names))
    finally:
        for handle in handles:
            handle.remove()
    scores: dict[str, float] = {}
    with torch.inference_mode():
        for op in lifted.ops:
            choice = choices.get(op.name)
            if choice is None or not choice.quantized or op.name not in records:
                scores[op.name] = 0.0
                continue
            module = modules[op.name]
            weight = _fake_quant_weight(module.weight, choice.weight)
            error, energy = 0.0, 0.0
            for x, y in records[op.name]:
                xq = _fake_quant_activation(x, choice.activation)
                if isinstance(module, nn.Linear):
                    yq = torch.nn.functional.linear(xq, weight, module.bias)
                else:
                    yq = module._conv_forward(xq, weight, module.bias)  # type: ignore[operator]
                error += float(((yq - y) ** 2).sum())
                energy += float((y**2).sum())
            scores[op.name] = error / energy if energy > 0 else 0.0
    return scores
