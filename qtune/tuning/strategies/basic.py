"""Basic strategy (after LPOT's), aimed at the most speed for the accuracy budget.

Stages, each reconstructed from the history alone (a pure function of space and history):

1. default: the preferred int8 config of each approach (static before dynamic for `auto`).
2. variants: the best default with every activation calibrated by another algorithm
   (e.g. percentile, kl): one trial each.
3. fallback search over *units* (fused groups by op name, else single ops; see `units.py`),
   ordered by accuracy sensitivity per unit of speed lost:
   a. probes: op-type-wise fallback (LPOT) of the one op type that holds most of the sensitivity
      but little of the time, when there is such a type; and the units whose sensitivity stands
      out by an order of magnitude (a cliff in the scores) when there is such a cliff;
   b. bisection (k-section with k parallel slots) over the prefix length of that order, unless a
      probe already passed. It trusts the smallest passing prefix above the largest failing one
      below it, so a noisy failure above a pass does not send it astray. About log2(units) trials.
4. refine: from the cheapest passing fallback config, re-quantize chunks of its fallback units,
   most speed and least sensitivity first, halving a chunk that fails (adaptive group testing,
   robust to non-monotone accuracy and never linear in the number of ops). Units that are
   certified sensitive or save no time are not worth a trial. A fallback that costs speed and
   buys no accuracy is thereby dropped.
5. speed (objective latency): while passing configs exist but none is faster than `min_speedup`
   beyond doubt, propose speed-seeking configs derived from the fastest passing one: op types
   that int8 does not make faster (per the profile, else the light types) back to fp32, then its
   fp32 units with the most time and least sensitivity quantized again.

Every stage waits for all of its trials before the next proposal (a barrier), so the proposals
do not depend on the order in which parallel trials finish.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

from qtune.tuning.config import TuneConfig
from qtune.tuning.history import History, TrialRecord
from qtune.tuning.space import TuningSpace
from qtune.tuning.strategies.base import Strategy, strategy_registry
from qtune.tuning.strategies.units import (
    Unit,
    build_units,
    certified,
    estimated_time,
    fallback_priority,
    fill_holes,
    gap_size,
)

logger = logging.getLogger(__name__)

TYPE_PROBE_SENSITIVITY = 0.6
"""An op type holding at least this share of the total sensitivity ..."""
TYPE_PROBE_GAIN = 0.25
"""... and at most this share of the total gain is tried as a whole (op-type-wise fallback) first."""
MIN_REFINE_GAIN = 0.01
"""A chunk of fallback units saving less than this fraction of the fp32 time is not worth a trial."""
SPEED_REQUANTIZE = 2
"""How many single fp32 units of the fastest passing config the speed stage quantizes again."""
SPEED_TRIALS = 5
"""At most this many speed-stage trials per run (the session's maxTrials bounds the rest)."""
SLOW_TYPE_SHARE = 0.05
"""Speed stage: op types saving at most this share of the int8 gain go back to fp32 together."""


@dataclass
class _Plan:
    todo: list[TuneConfig]
    complete: bool


def _accuracy_key(record: TrialRecord) -> float:
    return record.accuracy if (record.ok and record.accuracy is not None) else -math.inf


def _ladder(start: int, count: int) -> list[int]:
    """Prefix lengths start, 2·start, 4·start, ... up to `count` (always ending with `count`)."""
    rungs, n = [], max(1, start)
    while n < count:
        rungs.append(n)
        n *= 2
    return [*rungs, count]


@strategy_registry
class BasicStrategy(Strategy):
    name = "basic"

    # ----- stage configs ------------------------------------------------------------------
    def _defaults(self, space: TuningSpace) -> list[TuneConfig]:
        return [space.default_config(approach) for approach in space.approaches]

    def _variants(self, space: TuningSpace, base: TuneConfig) -> list[TuneConfig]:
        if base.approach != "static":
            return []
        used = base.algorithms()
        algorithms: list[str] = []
        for op in space.ops.values():
            for algorithm in op.activation.get("algorithm") or []:
                if algorithm not in used and algorithm not in algorithms:
                    algorithms.append(algorithm)
        variants = []
        for algorithm in algorithms:
            updates = {}
            for name, op_cfg in base.ops.items():
                if op_cfg.activation.is_fp32:
                    continue
                candidate = replace(op_cfg, activation=replace(op_cfg.activation, algorithm=algorithm))
                if candidate in space.ops[name].choices(base.approach):
                    updates[name] = candidate
            if updates:
                variants.append(base.with_ops(updates))
        return variants

    @staticmethod
    def _fallback(base: TuneConfig, units: list[Unit], chosen: set[tuple[str, ...]]) -> TuneConfig:
        """`base` with the chosen units in fp32, holes of one light unit filled (contiguous regions)."""
        light = max((u.gain for u in units), default=0.0) * 0.1
        filled = fill_holes(units, chosen, light)
        return base.with_fallback([name for unit in units if unit.names in filled for name in unit.names])

    @staticmethod
    def _type_probe(units: list[Unit]) -> str | None:
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

    # ----- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _records(history: History, configs: list[TuneConfig]) -> list[TrialRecord | None]:
        by_key = {t.config_key: t for t in history.trials}
        return [by_key.get(c.key()) for c in configs]

    @staticmethod
    def _best(configs: list[TuneConfig], records: list[TrialRecord | None]) -> TuneConfig | None:
        scored = [(c, r) for c, r in zip(configs, records, strict=True) if r is not None and r.ok]
        if not scored:
            return None
        best_accuracy = max(_accuracy_key(r) for _, r in scored)
        return next(c for c, r in scored if _accuracy_key(r) == best_accuracy)

    def _fast_enough(self, record: TrialRecord) -> bool | None:
        """Whether a passing record is fast enough for the objective; None when it has no speed."""
        if self.objective != "latency":
            return True
        measured = record.speed_at(self.batch_size) if record.speed else None
        if measured is None:
            return None
        return measured.above(self.min_speedup)

    def _goal(self, history: History) -> bool:
        """A passing config exists that meets the objective (latency: its speedup interval lies
        above min_speedup; without any speed figures, passing is all that can be judged)."""
        passing = [t for t in history.trials if t.ok and t.passed]
        verdicts = [self._fast_enough(t) for t in passing]
        if any(v is True for v in verdicts):
            return True
        return bool(passing) and all(v is None for v in verdicts)

    # ----- the plan ---------------------------------------------------------------------------
    def _plan(self, space: TuningSpace, history: History, k: int) -> _Plan:
        seen = history.keys()

        def fresh(configs: list[TuneConfig]) -> list[TuneConfig]:
            out: list[TuneConfig] = []
            for config in configs:
                if config.key() not in seen and all(config.key() != c.key() for c in out):
                    out.append(config)
            return out[:k]

        def waiting(records: list[TrialRecord | None]) -> bool:
            return any(r is not None and not r.done for r in records)

        # 1. defaults
        defaults = self._defaults(space)
        records = self._records(history, defaults)
        todo = fresh(defaults)
        if todo or waiting(records):
            return _Plan(todo, False)
        if any(r is not None and r.passed for r in records):
            return self._speed_stage(space, history, k, fresh, waiting)
        base = self._best(defaults, records)
        if base is None:  # every default failed to run: nothing to build on
            return _Plan([], True)

        # 2. model-wise variants of the best default
        variants = self._variants(space, base)
        variant_records = self._records(history, variants)
        todo = fresh(variants)
        if todo or waiting(variant_records):
            return _Plan(todo, False)
        if any(r is not None and r.passed for r in variant_records):
            return self._speed_stage(space, history, k, fresh, waiting)
        base = self._best([base, *variants], [*self._records(history, [base]), *variant_records]) or base

        # 3. fallback search over units
        units = build_units(space, set(base.quantized_ops()))
        if not units:
            return _Plan([], True)
        order = fallback_priority(units)

        def prefix(n: int) -> TuneConfig:
            return self._fallback(base, units, {u.names for u in order[:n]})

        # 3a. probes
        probes: list[TuneConfig] = []
        type_probe = self._type_probe(units)
        if type_probe is not None:
            probes.append(self._fallback(base, units, {u.names for u in units if type_probe in u.op_types}))
        gap = gap_size(order)
        if gap is not None:
            probes.append(prefix(gap))
        probe_records = self._records(history, probes)
        todo = fresh(probes)
        if todo or waiting(probe_records):
            return _Plan(todo, False)
        passing_probes = [c for c, r in zip(probes, probe_records, strict=True) if r is not None and r.passed]

        # 3b. ladder then bisection over the prefix length (skipped when a probe passed)
        anchor_candidates = list(passing_probes)
        needed: set[tuple[str, ...]] = set()
        if not passing_probes:
            prefixes = [prefix(n) for n in range(len(order) + 1)]
            prefix_records = self._records(history, prefixes)
            if waiting(prefix_records):
                return _Plan([], False)
            passed = [n for n, r in enumerate(prefix_records) if r is not None and r.passed]
            if not passed:
                # climb from small sets (1, 2, 4, ... or from the cliff) until one passes: a failure of a
                # large prefix says nothing about a small one when accuracy is not monotone
                rungs = _ladder(gap or 1, len(order))
                todo = fresh([prefixes[n] for n in rungs if prefix_records[n] is None])
                if todo:
                    return _Plan(todo, False)
                return _Plan([], True)  # even everything in fp32 failed
            hi = min(passed)
            failed = [n for n, r in enumerate(prefix_records) if r is not None and r.done and not r.passed and n < hi]
            lo = max([0, *failed])
            if hi - lo > 1:
                points = sorted({lo + math.ceil(i * (hi - lo) / (k + 1)) for i in range(1, k + 1)})
                todo = fresh([prefixes[n] for n in points if lo < n < hi])
                if todo:
                    return _Plan(todo, False)
            elif lo == hi - 1 and prefix_records[lo] is not None:
                needed.add(order[hi - 1].names)  # prefix hi-1 failed, prefix hi passed
            anchor_candidates.append(prefixes[hi])

        # 4. refine the cheapest passing fallback config
        anchor = min(anchor_candidates, key=lambda c: (estimated_time(space, c), len(c.fp32_ops()), c.key()))
        refined = self._refine(space, history, base, units, order, anchor, needed)
        if refined is not None:
            return refined
        return self._speed_stage(space, history, k, fresh, waiting)

    def _refine(self, space: TuningSpace, history: History, base: TuneConfig, units: list[Unit],
                order: list[Unit], anchor: TuneConfig, needed: set[tuple[str, ...]]) -> _Plan | None:
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
                return _Plan([candidate], False)
            if not record.done:
                return _Plan([], False)
            spent += 1
            if record.passed:
                current = candidate
            elif len(chunk) > 1:
                half = (len(chunk) + 1) // 2
                queue[:0] = [chunk[:half], chunk[half:]]
        return None

    def _speed_stage(self, space: TuningSpace, history: History, k: int, fresh, waiting) -> _Plan:  # noqa: ANN001
        """Speed-seeking configs while passing configs exist but none is fast enough."""
        if self._goal(history):
            return _Plan([], True)
        passing = [t for t in history.trials if t.ok and t.passed and t.speed_at(self.batch_size) is not None]
        if not passing:
            return _Plan([], True)
        pending = history.pending()
        if pending:
            return _Plan([], False)

        def speed_key(t: TrialRecord) -> tuple[float, int, str]:
            measured = t.speed_at(self.batch_size)
            return (-(measured.speedup if measured else 0.0), len(t.config.fp32_ops()), t.config_key)

        fastest = min(passing, key=speed_key).config
        # bounded: every passing config spawns a few candidates, at most SPEED_TRIALS are run
        spawned = {c.key() for t in passing for c in self._speed_candidates(space, t.config)}
        if len(spawned & history.keys()) >= SPEED_TRIALS:
            return _Plan([], True)
        todo = fresh(self._speed_candidates(space, fastest))
        return _Plan(todo, not todo)

    def _speed_candidates(self, space: TuningSpace, best: TuneConfig) -> list[TuneConfig]:
        quantized = set(best.quantized_ops())
        defaults = {c.approach: c for c in self._defaults(space)}
        base = defaults.get(best.approach) or space.default_config()
        out: list[TuneConfig] = []
        gains = space.op_gains()
        # a. op types that int8 does not make faster (profile), or the light types (prior), in fp32
        by_type: dict[str, float] = {}
        for name in quantized:
            by_type[space.ops[name].op_type] = by_type.get(space.ops[name].op_type, 0.0) + gains.get(name, 0.0)
        total = sum(max(g, 0.0) for g in by_type.values()) or 1.0
        # one threshold, well away from zero: types whose int8 gain is about nothing (profile noise
        # puts them on either side of 0) fall back together, so two runs propose the same config
        slow = {t for t, g in by_type.items() if g <= SLOW_TYPE_SHARE * total}
        if slow and slow != set(by_type):
            out.append(best.with_fallback([n for n in quantized if space.ops[n].op_type in slow]))
        # b. fp32 units of `best` with the most time and least sensitivity, quantized again
        all_units = build_units(space, set(base.quantized_ops()))
        fp32 = set(best.fp32_ops())
        back = [u for u in all_units if all(n in fp32 for n in u.names) and u.gain > MIN_REFINE_GAIN
                and all(n in base.ops and not base.ops[n].is_fp32 for n in u.names)]
        back.sort(key=lambda u: (u.sensitivity / max(u.gain, 1e-12), u.position))
        for unit in back[:SPEED_REQUANTIZE]:
            out.append(best.with_ops({n: base.ops[n] for n in unit.names}))
        return out

    def needs_full_evaluation(self, space: TuningSpace, history: History, config: TuneConfig) -> bool:
        """The defaults and their calibration variants are ranked by accuracy even when they fail (the
        best becomes the base of the fallback search): they are evaluated in full."""
        defaults = self._defaults(space)
        ranked = {c.key() for c in defaults}
        for default in defaults:
            ranked.update(v.key() for v in self._variants(space, default))
        return config.key() in ranked

    def propose(self, space: TuningSpace, history: History, k: int) -> list[TuneConfig]:
        return self._plan(space, history, max(k, 1)).todo[:k]

    def goal_reached(self, space: TuningSpace, history: History) -> bool:
        """True only when the search has nothing better to try and a passing config meets the
        objective (see `_goal`)."""
        plan = self._plan(space, history, 1)
        return plan.complete and not plan.todo and not history.pending() and self._goal(history)
