"""The basic strategy's fallback search: from a failed config, the fewest units back to fp32 that pass.

From a *base* (the failed config the basic strategy found most promising: an all-int8 default or an
op-type-restricted one):

a. variants: the base with every activation calibrated by another algorithm (percentile, kl);
b. fallback over *units* (fused groups by op name, else single ops; see `units.py`), ordered by
   accuracy sensitivity per unit of speed lost: probes (LPOT's op-type-wise fallback of the one op
   type that holds most of the sensitivity but little of the time; the units whose sensitivity
   stands out by an order of magnitude), then a ladder (1, 2, 4, ... units) and bisection over the
   prefix length of that order. It trusts the smallest passing prefix above the largest failing one
   below it, so a noisy failure above a pass does not send it astray. About log2(units) trials;
c. refine: from the cheapest passing fallback config, re-quantize chunks of its fallback units, most
   speed and least sensitivity first, halving a chunk that fails (adaptive group testing, robust to
   non-monotone accuracy and never linear in the number of ops). Units certified sensitive or saving
   no time are not worth a trial; a fallback that costs speed and buys no accuracy is dropped.

Each step waits for all of its trials (a barrier). A pure function of (space, history, base).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from qtune.tuning.config import TuneConfig
from qtune.tuning.history import History, TrialRecord
from qtune.tuning.space import TuningSpace
from qtune.tuning.strategies.units import (
    Unit,
    build_units,
    certified,
    estimated_time,
    fallback_priority,
    fill_holes,
    gap_size,
)

TYPE_PROBE_SENSITIVITY = 0.6
"""An op type holding at least this share of the total sensitivity ..."""
TYPE_PROBE_GAIN = 0.25
"""... and at most this share of the total gain is tried as a whole (op-type-wise fallback) first."""
MIN_REFINE_GAIN = 0.01
"""A chunk of fallback units saving less than this fraction of the fp32 time is not worth a trial."""

Fresh = Callable[[Iterable[TuneConfig]], list[TuneConfig]]
Waiting = Callable[[list["TrialRecord | None"]], bool]


@dataclass
class Plan:
    """What a stage wants now: configs to start (none: wait), and whether the whole search is over."""

    todo: list[TuneConfig]
    complete: bool


def accuracy_key(record: TrialRecord) -> float:
    return record.accuracy if (record.ok and record.accuracy is not None) else -math.inf


def records_of(history: History, configs: list[TuneConfig]) -> list[TrialRecord | None]:
    by_key = {t.config_key: t for t in history.trials}
    return [by_key.get(c.key()) for c in configs]


def most_accurate(configs: list[TuneConfig], records: list[TrialRecord | None]) -> TuneConfig | None:
    scored = [(c, r) for c, r in zip(configs, records, strict=True) if r is not None and r.ok]
    if not scored:
        return None
    best_accuracy = max(accuracy_key(r) for _, r in scored)
    return next(c for c, r in scored if accuracy_key(r) == best_accuracy)


def variants(space: TuningSpace, base: TuneConfig) -> list[TuneConfig]:
    """`base` with every quantized activation calibrated by another algorithm, one config per algorithm."""
    if base.approach != "static":
        return []
    used = base.algorithms()
    algorithms: list[str] = []
    for op in space.ops.values():
        for algorithm in op.activation.get("algorithm") or []:
            if algorithm not in used and algorithm not in algorithms:
                algorithms.append(algorithm)
    out = []
    for algorithm in algorithms:
        updates = {}
        for name, op_cfg in base.ops.items():
            if op_cfg.activation.is_fp32:
                continue
            candidate = replace(op_cfg, activation=replace(op_cfg.activation, algorithm=algorithm))
            if space.ops[name].allows(candidate, base.approach):
                updates[name] = candidate
        if updates:
            out.append(base.with_ops(updates))
    return out


def with_units_fp32(base: TuneConfig, units: list[Unit], chosen: set[tuple[str, ...]]) -> TuneConfig:
    """`base` with the chosen units in fp32, holes of one light unit filled (contiguous regions)."""
    light = max((u.gain for u in units), default=0.0) * 0.1
    filled = fill_holes(units, chosen, light)
    return base.with_fallback([name for unit in units if unit.names in filled for name in unit.names])


def type_probe(units: list[Unit]) -> str | None:
    """The op type to fall back as a whole (LPOT's op-type-wise fallback), if one type holds most
    of the sensitivity and little of the time."""
    total_sens = sum(u.sensitivity for u in units)
    total_gain = sum(max(u.gain, 0.0) for u in units)
    if total_sens <= 0 or total_gain <= 0:
        return None
    by_type: dict[str, tuple[float, float]] = {}
    for unit in units:
        for op_type in dict.fromkeys(unit.op_types):
            sens, gain = by_type.get(op_type, (0.0, 0.0))
            by_type[op_type] = (sens + unit.sensitivity, gain + max(unit.gain, 0.0))
    for op_type, (sens, gain) in sorted(by_type.items(), key=lambda kv: (-kv[1][0], kv[0])):
        if sens >= TYPE_PROBE_SENSITIVITY * total_sens and gain <= TYPE_PROBE_GAIN * total_gain:
            return op_type
        break
    return None


def ladder(start: int, count: int) -> list[int]:
    """Prefix lengths start, 2·start, 4·start, ... up to `count` (always ending with `count`)."""
    rungs, n = [], max(1, start)
    while n < count:
        rungs.append(n)
        n *= 2
    return [*rungs, count]


def probe_configs(base: TuneConfig, units: list[Unit], gap: int | None,
                  prefix: Callable[[int], TuneConfig]) -> list[TuneConfig]:
    """The probes tried before the ladder: the op type to fall back as a whole (`type_probe`), and the
    prefix up to the cliff of sensitivity (`gap_size`)."""
    probes: list[TuneConfig] = []
    probe_type = type_probe(units)
    if probe_type is not None:
        probes.append(with_units_fp32(base, units, {u.names for u in units if probe_type in u.op_types}))
    if gap is not None:
        probes.append(prefix(gap))
    return probes


def prefix_search(history: History, order: list[Unit], prefix: Callable[[int], TuneConfig], gap: int | None,
                  k: int, fresh: Fresh, waiting: Waiting, needed: set[tuple[str, ...]]) -> Plan | TuneConfig | None:
    """Ladder then bisection over the prefix length of `order`: a Plan while it runs, then the shortest
    passing prefix (adding to `needed` the unit it shows is needed), or None when even all in fp32 failed."""
    prefixes = [prefix(n) for n in range(len(order) + 1)]
    prefix_records = records_of(history, prefixes)
    if waiting(prefix_records):
        return Plan([], False)
    passed = [n for n, r in enumerate(prefix_records) if r is not None and r.passed]
    if not passed:
        # climb from small sets (1, 2, 4, ... or from the cliff) until one passes: a failure of a
        # large prefix says nothing about a small one when accuracy is not monotone
        rungs = ladder(gap or 1, len(order))
        todo = fresh([prefixes[n] for n in rungs if prefix_records[n] is None])
        return Plan(todo, False) if todo else None  # None: even everything in fp32 failed
    hi = min(passed)
    failed = [n for n, r in enumerate(prefix_records) if r is not None and r.done and not r.passed and n < hi]
    lo = max([0, *failed])
    if hi - lo > 1:
        points = sorted({lo + math.ceil(i * (hi - lo) / (k + 1)) for i in range(1, k + 1)})
        todo = fresh([prefixes[n] for n in points if lo < n < hi])
        if todo:
            return Plan(todo, False)
    elif lo == hi - 1 and prefix_records[lo] is not None:
        needed.add(order[hi - 1].names)  # prefix hi-1 failed, prefix hi passed
    return prefixes[hi]


def search(space: TuningSpace, history: History, base: TuneConfig, k: int, fresh: Fresh,
           waiting: Waiting) -> Plan | None:
    """The fallback search from `base`; None once it has nothing more to try (or a variant passed)."""
    # a. model-wise variants of the base
    tried = variants(space, base)
    tried_records = records_of(history, tried)
    todo = fresh(tried)
    if todo or waiting(tried_records):
        return Plan(todo, False)
    if any(r is not None and r.passed for r in tried_records):
        return None
    base = most_accurate([base, *tried], [*records_of(history, [base]), *tried_records]) or base

    # b. fallback over units
    units = build_units(space, set(base.quantized_ops()))
    if not units:
        return None
    order = fallback_priority(units)

    def prefix(n: int) -> TuneConfig:
        return with_units_fp32(base, units, {u.names for u in order[:n]})

    gap = gap_size(order)
    probes = probe_configs(base, units, gap, prefix)
    probe_records = records_of(history, probes)
    todo = fresh(probes)
    if todo or waiting(probe_records):
        return Plan(todo, False)
    passing_probes = [c for c, r in zip(probes, probe_records, strict=True) if r is not None and r.passed]

    # ladder then bisection over the prefix length (skipped when a probe passed)
    anchor_candidates = list(passing_probes)
    needed: set[tuple[str, ...]] = set()
    if not passing_probes:
        found = prefix_search(history, order, prefix, gap, k, fresh, waiting, needed)
        if not isinstance(found, TuneConfig):
            return found
        anchor_candidates.append(found)

    # c. refine the cheapest passing fallback config
    anchor = min(anchor_candidates, key=lambda c: (estimated_time(space, c), len(c.fp32_ops()), c.key()))
    return refine(history, base, units, order, anchor, needed)


def refine(history: History, base: TuneConfig, units: list[Unit], order: list[Unit], anchor: TuneConfig,
           needed: set[tuple[str, ...]]) -> Plan | None:
    """Adaptive group testing over the anchor's fallback units; None once finished. Units shown
    to be needed (`needed`) or certified by their sensitivity are not tried again."""
    fp32 = set(anchor.fp32_ops())
    fallback = {u.names for u in units if all(n in fp32 for n in u.names)}
    sure = certified(order, fallback) | needed
    candidates = [u for u in order if u.names in fallback and u.names not in sure and u.gain > 0]
    # most speed per sensitivity first
    candidates.sort(key=lambda u: (u.sensitivity / max(u.gain, 1e-12), -u.gain, u.position))
    if not candidates:
        return None
    queue: list[list[Unit]] = [candidates] if len(candidates) == 1 else \
        [candidates[: (len(candidates) + 1) // 2], candidates[(len(candidates) + 1) // 2:]]
    cap = 2 * math.ceil(math.log2(len(candidates) + 1)) + 1
    current, spent = anchor, 0
    while queue and spent < cap:
        chunk = queue.pop(0)
        if sum(u.gain for u in chunk) < MIN_REFINE_GAIN:
            continue
        candidate = current.with_ops({n: base.ops[n] for u in chunk for n in u.names})
        if candidate.key() == current.key():
            continue
        record = history.find(candidate)
        if record is None:
            return Plan([candidate], False)
        if not record.done:
            return Plan([], False)
        spent += 1
        if record.passed:
            current = candidate
        elif len(chunk) > 1:
            half = (len(chunk) + 1) // 2
            queue[:0] = [chunk[:half], chunk[half:]]
    return None
