"""A sampler that learns from the trials so far: a small tree-structured Parzen estimator (TPE).

Once the structured stages are spent and trials remain, the rest of the space is searched along a
few coarse dimensions: each op type in int8 or fp32, the approach, the activation calibration
algorithm, scheme and dtype, the weight granularity and reduce_range, and how many of the most
sensitive units stay fp32. Every finished trial is mapped onto these dimensions and scored (a
passing one by its measured speed, a failing one by how far it missed); the best quarter is "good",
the rest "bad". Candidates are drawn from the good trials' value frequencies (add-one smoothed, so
unseen values keep a chance) and ranked by l(x)/g(x), the density ratio of good to bad (Bergstra et
al., 2011). A candidate is proposed only when that ratio is above 1 (it looks more like the good
trials than the bad ones) and the speed outlook expects it to beat the bar; when no draw qualifies,
the sampler has nothing left to say and the search ends.

Deterministic: draws come from `random.Random` seeded by the job's seed and the number of trials, so
the same history proposes the same configs in every process (pure Python: the operator imports it).
Two runs whose figures differ by noise (a local and a cluster run of one job) should propose the same
configs too: the dimensions come in a fixed order and candidates are ranked by their density ratio and
key, never by the noisy speed estimate (which only filters).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, replace

from qtune.tuning.config import OpConfig, TuneConfig
from qtune.tuning.criterion import Criterion
from qtune.tuning.history import History, TrialRecord
from qtune.tuning.space import TuningSpace
from qtune.tuning.strategies.outlook import Outlook, allowed_loss, shortfall
from qtune.tuning.strategies.units import build_units, fallback_priority

GOOD_SHARE = 0.25
DRAWS = 96
MAX_TYPE_DIMENSIONS = 10
FALLBACK_COUNTS = (0, 1, 2, 4)
CRASHED_SCORE = -5.0
KNOBS = {
    "algorithm": ("activation", "algorithm"),
    "act_scheme": ("activation", "scheme"),
    "act_dtype": ("activation", "dtype"),
    "weight_granularity": ("weight", "granularity"),
    "weight_reduce_range": ("weight", "reduce_range"),
}
"""Dimension name -> (tensor role, TensorConfig field), applied to every quantized op that allows it."""


@dataclass(frozen=True)
class Dimension:
    name: str
    values: tuple[Hashable, ...]


def _type_dimension(op_type: str) -> str:
    return f"type:{op_type}"


def dimensions(space: TuningSpace) -> list[Dimension]:
    dims: list[Dimension] = []
    if len(space.approaches) > 1:
        dims.append(Dimension("approach", tuple(space.approaches)))
    gains = space.op_gains()
    by_type: dict[str, float] = {}
    for name, op in space.ops.items():
        if any(op.quantizable(a) for a in space.approaches):
            by_type[op.op_type] = by_type.get(op.op_type, 0.0) + gains.get(name, 0.0)
    # the profile picks WHICH types (the most gain first) when there are too many; their order is fixed by
    # name, so that two runs whose profiles differ by noise draw the same points from the same seed
    chosen = sorted(by_type, key=lambda t: (-by_type[t], t))[:MAX_TYPE_DIMENSIONS]
    for op_type in sorted(chosen):
        dims.append(Dimension(_type_dimension(op_type), (True, False)))
    for knob, (role, field) in KNOBS.items():
        values: list[Hashable] = []
        for op in space.ops.values():
            options = op.activation if role == "activation" else (op.weight or {})
            for value in options.get(field) or []:
                value = bool(value) if field == "reduce_range" else value
                if value != "fp32" and value not in values:
                    values.append(value)
        if len(values) > 1:
            dims.append(Dimension(knob, tuple(values)))
    dims.append(Dimension("fallback", FALLBACK_COUNTS))
    return dims


def features(space: TuningSpace, config: TuneConfig, dims: list[Dimension]) -> dict[str, Hashable]:
    """Where `config` lies along `dims` (majorities: a config of other stages need not lie on the grid)."""
    base = space.default_config(config.approach)
    point: dict[str, Hashable] = {"approach": config.approach}
    quantized = set(config.quantized_ops())
    per_type: dict[str, list[bool]] = {}
    for name in base.quantized_ops():
        per_type.setdefault(space.ops[name].op_type, []).append(name in quantized)
    on_types = set()
    for dim in dims:
        if dim.name.startswith("type:"):
            flags = per_type.get(dim.name[5:], [])
            point[dim.name] = bool(flags) and sum(flags) * 2 > len(flags)
            if point[dim.name]:
                on_types.add(dim.name[5:])
        elif dim.name in KNOBS:
            role, field = KNOBS[dim.name]
            values: Counter[Hashable] = Counter()
            for name in quantized:
                tensor = getattr(config.ops[name], role)
                if tensor is not None and not tensor.is_fp32:
                    value = getattr(tensor, field)
                    values[bool(value) if field == "reduce_range" else value] += 1
            if values:
                point[dim.name] = max(values.items(), key=lambda kv: (kv[1], str(kv[0])))[0]
    held = sum(1 for n in base.quantized_ops() if space.ops[n].op_type in on_types and n not in quantized)
    point["fallback"] = max(c for c in FALLBACK_COUNTS if c <= held)
    return point


def build(space: TuningSpace, point: dict[str, Hashable], dims: list[Dimension]) -> TuneConfig | None:
    """The config at `point`: the op types switched on in int8 with the knobs set where the op allows
    them, then the `fallback` most sensitive of its units in fp32; None when nothing is quantized."""
    approach = str(point.get("approach", space.approaches[0]))
    base = space.default_config(approach)
    typed = {d.name[5:] for d in dims if d.name.startswith("type:")}
    on = {t for t in typed if point.get(_type_dimension(t))}
    config = base.with_fallback([n for n in base.quantized_ops() if space.ops[n].op_type not in on])
    updates: dict[str, OpConfig] = {}
    for name in config.quantized_ops():
        op_cfg = config.ops[name]
        for knob, (role, field) in KNOBS.items():
            if knob not in point:
                continue
            tensor = getattr(op_cfg, role)
            if tensor is None or tensor.is_fp32:
                continue
            candidate = replace(op_cfg, **{role: replace(tensor, **{field: point[knob]})})
            if space.ops[name].allows(candidate, approach):
                op_cfg = candidate
        updates[name] = op_cfg
    config = config.with_ops(updates)
    count = int(point.get("fallback", 0) or 0)
    if count:
        units = fallback_priority(build_units(space, set(config.quantized_ops())))
        config = config.with_fallback([n for unit in units[:count] for n in unit.names])
    return config if config.quantized_ops() else None


def score(record: TrialRecord, criterion: Criterion | None, baseline: float | None, batch_size: int | None,
          outlook: Outlook) -> float | None:
    """Higher is better: a passing config 1 + its speedup, a failing one minus its shortfall over the
    allowed loss (-1 when only known to fail), a crashed one CRASHED_SCORE; None while pending."""
    if not record.done:
        return None
    if not record.ok:
        return CRASHED_SCORE
    if record.passed:
        measured = record.speed_at(batch_size)
        return 1.0 + (measured.speedup if measured is not None else outlook.expected(record.tune_config))
    if criterion is None or baseline is None:
        return -1.0
    missed = shortfall(record, criterion, baseline)
    if missed is None:
        return -1.0
    return -min(4.0, missed / max(allowed_loss(criterion, baseline), 1e-12))


def _frequencies(points: list[dict[str, Hashable]], dim: Dimension) -> dict[Hashable, float]:
    counts = Counter(p[dim.name] for p in points if dim.name in p)
    total = sum(counts[v] for v in dim.values) + len(dim.values)
    return {v: (counts[v] + 1) / total for v in dim.values}


def propose(space: TuningSpace, history: History, k: int, seed: int, outlook: Outlook,
            criterion: Criterion | None, batch_size: int | None) -> list[TuneConfig]:
    """Up to k untried configs, best density ratio first, each expected to beat `outlook.bar`."""
    dims = dimensions(space)
    baseline = history.baseline.accuracy if history.baseline is not None else None
    scored = [(s, t) for t in history.trials
              if (s := score(t, criterion, baseline, batch_size, outlook)) is not None]
    if len(scored) < 2:
        return []
    scored.sort(key=lambda st: (-st[0], st[1].index))
    cut = max(1, math.ceil(GOOD_SHARE * len(scored)))
    points = [features(space, t.tune_config, dims) for _, t in scored]
    good = {d.name: _frequencies(points[:cut], d) for d in dims}
    bad = {d.name: _frequencies(points[cut:], d) for d in dims}
    rng = random.Random(f"tpe:{seed}:{len(history.trials)}")
    seen = history.keys()
    candidates: dict[str, tuple[float, float, TuneConfig]] = {}
    for _ in range(DRAWS):
        point: dict[str, Hashable] = {}
        ratio = 0.0
        for dim in dims:
            weights = [good[dim.name][v] for v in dim.values]
            value = rng.choices(dim.values, weights=weights)[0]
            point[dim.name] = value
            ratio += math.log(good[dim.name][value] / bad[dim.name][value])
        if ratio <= 0.0:
            continue  # looks more like the trials that did badly than like the good ones
        config = build(space, point, dims)
        if config is None:
            continue
        key = config.key()
        if key in seen or key in candidates or not outlook.promising(config):
            continue
        candidates[key] = (ratio, outlook.expected(config), config)
    # ranked by the density ratio (a function of the trials' order, not of their exact figures), then the
    # key: the expected speed only filters (`promising`), as it moves with every run's noise
    ranked = sorted(candidates.items(), key=lambda kv: (-round(kv[1][0], 9), kv[0]))
    return [config for _, (_, _, config) in ranked[:k]]
