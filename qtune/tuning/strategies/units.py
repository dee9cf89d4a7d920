"""Fallback units and the speed model the basic strategy searches with (plain functions of the space).

A *unit* is what falls back to fp32 as a whole: a fused group (a Conv and its Relu, a Gemm and its
activation), a light chain (`space.light_chains`: a hard-swish between two Convs, int8 only when whole), or a
single op outside any of them. Falling back one op of a fused chain leaves Q/DQ
around an unfused fp32 kernel, which measured slower than fp32 alone (FIELD-NOTES), so the search
never splits a group.

Each unit carries its accuracy sensitivity (the sum over its ops) and its *gain*: the fraction of
the fp32 model's time that quantizing it saves, from the profiler's per-op time shares when the
baseline measured them (`space.time_share`), else a prior by op type (`TuningSpace.op_gains`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qtune.tuning.config import TuneConfig
from qtune.tuning.space import TuningSpace

MIN_SENSITIVITY = 1e-9


@dataclass(frozen=True)
class Unit:
    names: tuple[str, ...]
    op_types: tuple[str, ...]
    position: int
    """Graph position of the unit's first op (units are listed in graph order)."""
    sensitivity: float
    gain: float

    @property
    def label(self) -> str:
        return "+".join(self.names)


def _groups_from_patterns(space: TuningSpace) -> list[list[str]]:
    """Fused groups guessed from type patterns when the adaptor gave no names: consecutive ops in
    graph order whose types spell a pattern (longest pattern first)."""
    names = list(space.ops)
    patterns = sorted((p for p in space.fused_patterns if len(p) > 1), key=len, reverse=True)
    groups: list[list[str]] = []
    i = 0
    while i < len(names):
        for pattern in patterns:
            window = names[i:i + len(pattern)]
            if [space.ops[n].op_type for n in window] == list(pattern):
                groups.append(window)
                i += len(pattern)
                break
        else:
            i += 1
    return groups


def build_units(space: TuningSpace, quantized: set[str]) -> list[Unit]:
    """The units of the ops quantized in the base config, in graph order."""
    position = {name: i for i, name in enumerate(space.ops)}
    gains = space.op_gains()
    groups = space.fused_groups or _groups_from_patterns(space)
    owner: dict[str, int] = {}
    members: list[list[str]] = []
    for group in groups:
        names = [n for n in group if n in quantized and n not in owner]
        if not names:
            continue
        for name in names:
            owner[name] = len(members)
        members.append(names)
    for chain in space.light_chains:  # a light chain runs int8 whole or pays Q/DQ pairs: it falls back whole
        names = [n for n in chain.ops if n in quantized and n not in owner]
        if len(names) > 1:
            for name in names:
                owner[name] = len(members)
            members.append(names)
    for name in space.ops:
        if name in quantized and name not in owner:
            owner[name] = len(members)
            members.append([name])
    units = []
    for names in members:
        names = sorted(names, key=position.__getitem__)
        units.append(Unit(
            names=tuple(names),
            op_types=tuple(space.ops[n].op_type for n in names),
            position=position[names[0]],
            sensitivity=sum(max(space.sensitivity.get(n, 0.0), 0.0) for n in names),
            gain=sum(gains.get(n, 0.0) for n in names),
        ))
    return sorted(units, key=lambda u: u.position)


def fallback_priority(units: list[Unit]) -> list[Unit]:
    """Units in the order they fall back: most accuracy bought per unit of speed lost first.

    Sensitivity dominates (scores span orders of magnitude); the gain divides it, so among equally
    sensitive units the cheap ones go first. Without any sensitivity measurement the last units
    go first (outputs tend to be fragile), as LPOT's order does."""
    top = max((u.gain for u in units), default=1.0)
    floor = top * 0.01 if top > 0 else 1e-6  # gains can be <= 0 (int8 slower than fp32 everywhere)

    def key(unit: Unit) -> tuple[float, int]:
        score = math.log(unit.sensitivity + MIN_SENSITIVITY) - math.log(max(unit.gain, floor))
        return (-score, -unit.position)

    return sorted(units, key=key)


def gap_size(ordered: list[Unit], factor: float = 20.0) -> int | None:
    """The number of leading units whose sensitivity stands out: the first n (at most half of the
    units) where unit n's sensitivity is at least `factor` times every later unit's. None when no
    such cliff exists (graded sensitivities)."""
    sens = [u.sensitivity for u in ordered]
    best, best_ratio = None, factor
    for n in range(1, max(1, len(sens) // 2) + 1):
        rest = max(sens[n:], default=0.0)
        ratio = (min(sens[:n]) + MIN_SENSITIVITY) / (rest + MIN_SENSITIVITY)
        if ratio >= best_ratio:
            best, best_ratio = n, ratio
    return best


def certified(ordered: list[Unit], fallback: set[tuple[str, ...]], factor: float = 20.0) -> set[tuple[str, ...]]:
    """Fallback units whose sensitivity is at least `factor` times that of every quantized unit:
    re-quantizing them is not worth a trial."""
    quantized = [u.sensitivity for u in ordered if u.names not in fallback]
    ceiling = max(quantized, default=0.0)
    return {u.names for u in ordered if u.names in fallback
            and u.sensitivity + MIN_SENSITIVITY >= factor * (ceiling + MIN_SENSITIVITY)}


def fill_holes(units: list[Unit], fallback: set[tuple[str, ...]], max_gain: float) -> set[tuple[str, ...]]:
    """Prefer contiguous fp32 regions: a single quantized unit between two fallback units (in graph
    order) whose gain is at most `max_gain` falls back too; an int8 island of one light op costs a
    Q/DQ pair for nothing."""
    out = set(fallback)
    for before, middle, after in zip(units, units[1:], units[2:], strict=False):
        if before.names in out and after.names in out and middle.names not in out and middle.gain <= max_gain:
            out.add(middle.names)
    return out


def estimated_time(space: TuningSpace, config: TuneConfig) -> float:
    """Estimated latency of `config` relative to fp32 (1.0 = as fast as fp32) from the op gains;
    an ordering aid only: decisions rest on measured speedups."""
    gains = space.op_gains()
    return 1.0 - sum(gains.get(name, 0.0) for name in config.quantized_ops())
