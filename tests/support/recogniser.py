"""A simulated conv + attention text recogniser: where int8 pays only in a few compute-heavy ops.

Shaped after the issue-18 model (PP-OCRv4 rec): 38 Conv blocks with hard-swish (Conv -> Add -> Clip
-> Mul -> Div), then 13 MatMul blocks (MatMul -> Add -> Softmax -> Mul). Per-op times make Conv and
MatMul ~2x faster in int8 while every quantized element-wise op costs more than it saves (its Q/DQ),
and every int8/fp32 switch along the graph costs a little. Accuracy: the first Conv and the
hard-swish Muls are sensitive; all-int8 fails by far, Conv+MatMul alone misses narrowly with MinMax,
and passes with percentile calibration and the first Conv kept fp32 (what a hand-made scan found).
"""

from __future__ import annotations

from typing import Any

from qtune.protocol import SpeedMeasurement
from qtune.spec.models import QuantizationSpec
from qtune.tuning.config import TuneConfig
from qtune.tuning.space import TuningSpace, build_space

CONV_BLOCK = ("Conv", "Add", "Clip", "Mul", "Div")
HEAD_BLOCK = ("MatMul", "Add", "Softmax", "Mul")
FP32_MS = {"Conv": 1.0, "MatMul": 0.8}
INT8_MS = {"Conv": 0.42, "MatMul": 0.36}
LIGHT_FP32_MS, LIGHT_INT8_MS = 0.03, 0.06
SWITCH_MS = 0.02
BASELINE = 0.9675

_ACT = {"dtype": ["uint8", "int8", "fp32"], "scheme": ["asym", "sym"], "granularity": ["per_tensor"],
        "algorithm": ["minmax", "kl", "percentile"], "reduce_range": [False, True]}
_WEIGHT = {"dtype": ["int8", "uint8", "fp32"], "scheme": ["sym", "asym"], "granularity": ["per_channel", "per_tensor"],
           "algorithm": ["minmax"], "reduce_range": [False, True]}


def op_names() -> list[tuple[str, str]]:
    names: list[tuple[str, str]] = []
    for block in range(38):
        names += [(f"conv{block:02d}_{t.lower()}", t) for t in CONV_BLOCK]
    for block in range(13):
        names += [(f"head{block:02d}_{t.lower()}", t) for t in HEAD_BLOCK]
    return names


def _fp32_ms(op_type: str) -> float:
    return FP32_MS.get(op_type, LIGHT_FP32_MS)


def _int8_ms(op_type: str) -> float:
    return INT8_MS.get(op_type, LIGHT_INT8_MS)


def recogniser_space(profile: bool = True) -> TuningSpace:
    opwise: dict[tuple[str, str], dict[str, Any]] = {}
    for name, op_type in op_names():
        entry: dict[str, Any] = {"activation": dict(_ACT), "approach": ["static"]}
        if op_type in ("Conv", "MatMul"):
            entry["weight"] = dict(_WEIGHT)
        opwise[(name, op_type)] = entry
    capability = {"optypewise": {}, "opwise": opwise, "graph_order": [n for n, _ in op_names()],
                  "fused_groups": [[f"conv{b:02d}_conv", f"conv{b:02d}_add"] for b in range(38)]
                  + [[f"head{b:02d}_matmul", f"head{b:02d}_add"] for b in range(13)]}
    space = build_space(capability, QuantizationSpec(), [["Conv", "Add"], ["MatMul", "Add"]], 400)
    space.sensitivity = {name: (5.0 if name == "conv00_conv" else 0.3 if op_type == "Mul" else
                                0.1 if op_type in ("Conv", "MatMul") else 0.02)
                         for name, op_type in op_names()}
    if profile:
        total = sum(_fp32_ms(t) for _, t in op_names())
        space.time_share = {"fp32": {n: _fp32_ms(t) / total for n, t in op_names()},
                            "int8": {n: _int8_ms(t) / total for n, t in op_names()}}
    return space


def accuracy(config: TuneConfig) -> float:
    """Exact-match accuracy out of 400 samples (multiples of 1/400)."""
    lost = 0.0
    for name, op in config.ops.items():
        if op.is_fp32:
            continue
        percentile = op.activation.algorithm == "percentile"
        if name == "conv00_conv":
            lost += 0.004 if percentile else 0.008
        elif op.op_type in ("Conv", "MatMul"):
            lost += 0.00012 if percentile else 0.00016
        elif op.op_type == "Mul":
            lost += 0.0005
        else:
            lost += 0.00005
    return round((BASELINE - lost) * 400) / 400


def speedup(config: TuneConfig) -> float:
    names = [n for n, _ in op_names()]
    reference = sum(_fp32_ms(config.ops[n].op_type) for n in names)
    own = sum((_fp32_ms if config.ops[n].is_fp32 else _int8_ms)(config.ops[n].op_type) for n in names)
    switches = sum(config.ops[a].is_fp32 != config.ops[b].is_fp32 for a, b in zip(names, names[1:], strict=False))
    own += SWITCH_MS * switches
    return reference / own


def speed(config: TuneConfig, batch: int = 32, half_width: float = 0.04) -> dict[str, Any]:
    value = speedup(config)
    return {str(batch): SpeedMeasurement(
        batch_size=batch, p50_ms=10.0 / value, p90_ms=11.0 / value, fp32_p50_ms=10.0, fp32_p90_ms=11.0,
        speedup=value, low=value * (1 - half_width), high=value * (1 + half_width), rounds=7)}
