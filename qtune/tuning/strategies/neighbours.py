"""Neighbours of a near miss: the same config with one quantization knob changed, or one more unit in fp32.

A config that missed the criterion by a small margin is often one calibration or scheme away from
passing (FIELD-NOTES: configs missing by one sample of 719 were never retried with another
calibration, granularity or scheme). The knobs are whatever the space expresses for the config's
quantized ops (the adaptor's capability intersected with the job's constraints), tried in this order:

1. the activation calibration algorithm (minmax / kl / percentile), each other one;
2. the most sensitive quantized unit (fused group) in fp32;
3. weight granularity (per-channel <-> per-tensor);
4. symmetric activations;
5. the activation dtype (uint8 <-> int8);
6. reduce_range (7-bit) weights, then activations;
7. the two most sensitive quantized units in fp32;
8. half the calibration samples (a range from fewer samples clips fewer outliers);
9. (SmoothQuant on) each other SmoothQuant alpha of the space, nearest first.

A knob applies to an op only where the changed setting is one of the op's choices; a neighbour that
changes nothing is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from qtune.tuning.config import OpConfig, TuneConfig
from qtune.tuning.space import SMOOTH_QUANT, TuningSpace
from qtune.tuning.strategies.units import build_units, fallback_priority

MIN_CALIBRATION_SAMPLES = 16
"""Halving the calibration samples stops here."""

Change = Callable[[OpConfig], OpConfig | None]


def _with(space: TuningSpace, config: TuneConfig, change: Change) -> TuneConfig | None:
    """`config` with `change` applied to every quantized op where the result is a valid choice."""
    updates: dict[str, OpConfig] = {}
    for name in config.quantized_ops():
        current = config.ops[name]
        changed = change(current)
        if changed is None or changed == current:
            continue
        if space.ops[name].allows(changed, config.approach):
            updates[name] = changed
    return config.with_ops(updates) if updates else None


def _activation(field: str, value: object) -> Change:
    def change(op: OpConfig) -> OpConfig | None:
        if op.activation.is_fp32:
            return None
        return replace(op, activation=replace(op.activation, **{field: value}))
    return change


def _weight(field: str, value: object) -> Change:
    def change(op: OpConfig) -> OpConfig | None:
        if op.weight is None or op.weight.is_fp32:
            return None
        return replace(op, weight=replace(op.weight, **{field: value}))
    return change


def _flip_dtype(op: OpConfig) -> OpConfig | None:
    if op.activation.is_fp32:
        return None
    other = {"uint8": "int8", "int8": "uint8"}.get(op.activation.dtype)
    return None if other is None else replace(op, activation=replace(op.activation, dtype=other))


def _flip_granularity(op: OpConfig) -> OpConfig | None:
    if op.weight is None or op.weight.is_fp32:
        return None
    other = {"per_channel": "per_tensor", "per_tensor": "per_channel"}.get(op.weight.granularity or "")
    return None if other is None else replace(op, weight=replace(op.weight, granularity=other))


def _algorithms(space: TuningSpace, config: TuneConfig) -> list[str]:
    used = config.algorithms()
    found: list[str] = []
    for name in config.quantized_ops():
        for algorithm in space.ops[name].activation.get("algorithm") or []:
            if algorithm not in used and algorithm not in found:
                found.append(algorithm)
    return found


def _fallback(space: TuningSpace, config: TuneConfig, count: int) -> TuneConfig | None:
    units = fallback_priority(build_units(space, set(config.quantized_ops())))
    if len(units) <= count:
        return None
    return config.with_fallback([n for unit in units[:count] for n in unit.names])


def _alpha_neighbours(space: TuningSpace, config: TuneConfig) -> list[TuneConfig]:
    """`config` with each other SmoothQuant alpha of the space, nearest to its own first."""
    alpha = config.extras.get(SMOOTH_QUANT)
    if config.approach != "static" or alpha is None:
        return []
    def distance(other: float | str) -> tuple[float, str]:  # per_layer (a str) is neither near nor far
        if isinstance(other, str) or isinstance(alpha, str):
            return 1.0, str(other)
        return round(abs(other - alpha), 6), f"{other:08.4f}"

    others = sorted((a for a in space.smooth_quant_alphas if a != alpha), key=distance)
    return [replace(config, extras={**config.extras, SMOOTH_QUANT: a}) for a in others]


def neighbours(space: TuningSpace, config: TuneConfig) -> list[TuneConfig]:
    """The near-miss neighbours of `config`, in the order they are worth trying (module docstring)."""
    out: list[TuneConfig | None] = []
    if config.approach == "static":
        out += [_with(space, config, _activation("algorithm", a)) for a in _algorithms(space, config)]
    out.append(_fallback(space, config, 1))
    out.append(_with(space, config, _flip_granularity))
    if config.approach == "static":
        out.append(_with(space, config, _activation("scheme", "sym")))
    out.append(_with(space, config, _flip_dtype))
    out.append(_with(space, config, _weight("reduce_range", True)))
    if config.approach == "static":
        out.append(_with(space, config, _activation("reduce_range", True)))
    out.append(_fallback(space, config, 2))
    if config.approach == "static" and config.calibration_sampling_size // 2 >= MIN_CALIBRATION_SAMPLES:
        out.append(replace(config, calibration_sampling_size=config.calibration_sampling_size // 2))
    out += _alpha_neighbours(space, config)
    unique: dict[str, TuneConfig] = {}
    for candidate in out:
        if candidate is not None and candidate.key() != config.key():
            unique.setdefault(candidate.key(), candidate)
    return list(unique.values())

