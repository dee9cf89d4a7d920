"""Basic strategy (after LPOT's), aimed at the most speed for the accuracy budget.

Stages, each reconstructed from the history alone (a pure function of space and history):

1. default: the preferred int8 config of each approach (static before dynamic for `auto`).
2. restricted (`restricted.py`): when the defaults fail, or pass without being fast enough, the
   op-type-restricted configs where int8 pays (only the compute-heavy types, e.g. Conv+MatMul),
   best expected speed per accuracy risked first, and only those expected to beat the defaults.
3. fallback search (`fallback.py`) from the most promising failed config (a default or a restricted
   one: expected gain times how close it came to the criterion; once a config passes, only one
   expected to be clearly faster): calibration variants, then probes, a ladder and bisection over
   units (fused groups) in order of sensitivity per speed lost, then a refine that gives back units
   which buy no accuracy. About log2(units) trials.
4. speed (objective latency): while passing configs exist but none is faster than `min_speedup`
   beyond doubt, speed-seeking configs derived from the fastest passing one: op types that int8
   does not make faster back to fp32, then its fp32 units with the most time quantized again.
5. budget (`neighbours.py`, `sampler.py`): the search does not end while trials remain and a
   promising config is untried. Near misses (failed by at most the allowed loss again, expected to
   beat the bar of `outlook.py`) are retried one knob away (calibration algorithm, granularity,
   symmetric or int8 activations, reduce_range, a sensitive unit in fp32, fewer calibration
   samples); then, while no passing config meets the goal, a sampler that learns from every trial so
   far (TPE) proposes from the rest of the space.

A weight-only space (approach weight_only) is searched by the mixed_bits ladder instead (`mixed_bits.py`):
per layer int4, int8 or fp32, most sensitive layers first.

The goal (a passing config faster than `min_speedup` beyond doubt) ends the search as soon as no
untried config is expected to be clearly faster than the fastest passing one (`outlook.py`); without
it the whole budget is spent and the fastest passing config wins.

Every stage waits for all of its trials before the next proposal (a barrier), so the proposals
do not depend on the order in which parallel trials finish.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from qtune.tuning.config import TuneConfig
from qtune.tuning.history import History, TrialRecord
from qtune.tuning.space import WEIGHT_ONLY, TuningSpace
from qtune.tuning.strategies import fallback
from qtune.tuning.strategies.base import Strategy, strategy_registry
from qtune.tuning.strategies.fallback import MIN_REFINE_GAIN, Plan, accuracy_key, records_of, variants
from qtune.tuning.strategies.neighbours import neighbours
from qtune.tuning.strategies.outlook import Outlook, closeness, near_miss
from qtune.tuning.strategies.restricted import RESTRICTED_TRIALS, restricted_candidates
from qtune.tuning.strategies.sampler import propose as sample
from qtune.tuning.strategies.units import build_units

logger = logging.getLogger(__name__)

SPEED_REQUANTIZE = 2
"""How many single fp32 units of the fastest passing config the speed stage quantizes again."""
SPEED_TRIALS = 5
"""At most this many speed-stage trials per run (the session's maxTrials bounds the rest)."""
SLOW_TYPE_SHARE = 0.05
"""Speed stage: op types saving at most this share of the int8 gain go back to fp32 together."""


@strategy_registry
class BasicStrategy(Strategy):
    name = "basic"

    # ----- stage configs ------------------------------------------------------------------
    def _defaults(self, space: TuningSpace) -> list[TuneConfig]:
        """One per approach; static once per SmoothQuant alpha (alpha auto: the search starts from each)."""
        return space.default_configs()

    # ----- helpers ----------------------------------------------------------------------------
    def _fast_enough(self, record: TrialRecord) -> bool | None:
        """Whether a passing record is fast enough for the objective; None when it has no speed."""
        if self.objective != "latency":
            return True
        measured = record.speed_at(self.batch_size) if record.speed else None
        if measured is None:
            return None
        return measured.above(self.min_speedup)

    def _goal(self, history: History | list[TrialRecord]) -> bool:
        """A passing config exists that meets the objective (latency: its speedup interval lies
        above min_speedup; without any speed figures, passing is all that can be judged)."""
        records = history.trials if isinstance(history, History) else history
        passing = [t for t in records if t.ok and t.passed]
        verdicts = [self._fast_enough(t) for t in passing]
        if any(v is True for v in verdicts):
            return True
        return bool(passing) and all(v is None for v in verdicts)

    # ----- the plan ---------------------------------------------------------------------------
    def _plan(self, space: TuningSpace, history: History, k: int) -> Plan:
        seen = history.keys()

        def fresh(configs: Iterable[TuneConfig]) -> list[TuneConfig]:
            out: dict[str, TuneConfig] = {}
            for config in configs:
                if config.key() not in seen:
                    out.setdefault(config.key(), config)
                    if len(out) >= k:
                        break
            return list(out.values())

        def waiting(records: list[TrialRecord | None]) -> bool:
            return any(r is not None and not r.done for r in records)

        # 1. defaults
        defaults = self._defaults(space)
        records = records_of(history, defaults)
        todo = fresh(defaults)
        if todo or waiting(records):
            return Plan(todo, False)

        # 2. op-type-restricted configs where int8 pays
        restricted = self._restricted(space, history, defaults, records)
        restricted_records = records_of(history, restricted)
        todo = fresh(restricted)
        if todo or waiting(restricted_records):
            return Plan(todo, False)

        # 3. fallback search from the most promising failed config
        base = self._fallback_base(space, history, [*defaults, *restricted], [*records, *restricted_records])
        if base is not None:
            plan = fallback.search(space, history, base, k, fresh, waiting)
            if plan is not None:
                return plan

        # 4. speed-seeking configs, 5. the rest of the budget
        if not self._goal(history):
            plan = self._speed_stage(space, history, fresh)
            if plan is not None:
                return plan
        return self._budget_stage(space, history, k, fresh)

    def _outlook(self, space: TuningSpace, records: list[TrialRecord | None] | list[TrialRecord]) -> Outlook:
        """The speed outlook learnt from `records` (and whether they meet the goal)."""
        known = [r for r in records if r is not None]
        return Outlook.of(space, known, self.batch_size, self.min_speedup, self._goal(known))

    def _baseline(self, history: History) -> float | None:
        return history.baseline.accuracy if history.baseline is not None else None

    def _restricted(self, space: TuningSpace, history: History, defaults: list[TuneConfig],
                    records: list[TrialRecord | None]) -> list[TuneConfig]:
        """The best-ranked restricted configs, judged from the defaults' records alone (so the stage's
        list does not change while its trials finish)."""
        outlook = self._outlook(space, records)
        ranked = restricted_candidates(space, defaults, records, outlook, self.criterion, self._baseline(history))
        for candidate in ranked[:RESTRICTED_TRIALS]:
            logger.debug("restricted candidate %s: gain %.3f, risk %.2f", candidate.label, candidate.gain,
                         candidate.risk)
        return [candidate.config for candidate in ranked[:RESTRICTED_TRIALS]]

    def _fallback_base(self, space: TuningSpace, history: History, configs: list[TuneConfig],
                       records: list[TrialRecord | None]) -> TuneConfig | None:
        """The failed config to search fallbacks from: most expected gain times closeness to the
        criterion, preferring configs expected to beat the bar (min_speedup, or clearly faster than
        every passing config). Once a config passes, only such configs are worth it; before, any
        passing config is worth finding. Without a known criterion (a strategy used on its own), the
        most accurate failed config, as LPOT does."""
        outlook = self._outlook(space, records)
        failed = [(c, r) for c, r in zip(configs, records, strict=True)
                  if r is not None and r.ok and not r.passed and r.accuracy is not None]
        if self.criterion is None:
            return max(failed, key=lambda cr: (accuracy_key(cr[1]), cr[0].key()))[0] if failed else None
        any_passed = any(r is not None and r.passed for r in records)
        scored = []
        for config, record in failed:
            near = closeness(record, self.criterion, self._baseline(history))
            promising = outlook.promising(config)
            if near is not None and (promising or not any_passed):
                scored.append((promising, outlook.gain(config) * near, config.key(), config))
        return max(scored, key=lambda item: item[:3])[3] if scored else None

    def _budget_stage(self, space: TuningSpace, history: History, k: int, fresh) -> Plan:  # noqa: ANN001
        """Near-miss neighbours, then (goal not met) the learning sampler; complete when nothing
        promising is left. A barrier: proposes only once every trial has finished."""
        if history.pending():
            return Plan([], False)
        outlook = self._outlook(space, history.trials)
        baseline = self._baseline(history)
        misses = [t for t in history.trials
                  if near_miss(t, self.criterion, baseline) and outlook.promising(t.tune_config)]
        misses.sort(key=lambda t: (-(outlook.gain(t.tune_config) * (closeness(t, self.criterion, baseline) or 0.0)),
                                   t.index))
        todo = fresh(n for t in misses for n in neighbours(space, t.tune_config) if outlook.promising(n))
        if todo:
            return Plan(todo, False)
        if not self._goal(history):
            todo = fresh(sample(space, history, k, self.seed, outlook, self.criterion, self.batch_size))
            if todo:
                return Plan(todo, False)
        return Plan([], True)

    def _speed_stage(self, space: TuningSpace, history: History, fresh) -> Plan | None:  # noqa: ANN001
        """Speed-seeking configs while passing configs exist but none is fast enough; None when done."""
        passing = [t for t in history.trials if t.ok and t.passed and t.speed_at(self.batch_size) is not None]
        if not passing:
            return None
        if history.pending():
            return Plan([], False)

        def speed_key(t: TrialRecord) -> tuple[float, int, str]:
            measured = t.speed_at(self.batch_size)
            return (-(measured.speedup if measured else 0.0), len(t.tune_config.fp32_ops()), t.config_key)

        fastest = min(passing, key=speed_key).tune_config
        # bounded: every passing config spawns a few candidates, at most SPEED_TRIALS are run
        spawned = {c.key() for t in passing for c in self._speed_candidates(space, t.tune_config)}
        if len(spawned & history.keys()) >= SPEED_TRIALS:
            return None
        todo = fresh(self._speed_candidates(space, fastest))
        return Plan(todo, False) if todo else None

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
        """Exact scores where they steer the search: the defaults and their calibration variants (the
        best failed one can become the base of the fallback search), and every config that would be
        a success if it passed (expected faster than min_speedup by the uncalibrated outlook, or any
        config for objective size): if it fails, how close it came decides whether its neighbours
        are tried. A config that could not be a success may stop evaluating once it cannot pass."""
        if self.objective != "latency":
            return True
        if space.approaches == [WEIGHT_ONLY]:
            return False  # the mixed_bits ladder needs only pass or fail
        defaults = self._defaults(space)
        ranked = {c.key() for c in defaults}
        for default in defaults:
            ranked.update(v.key() for v in variants(space, default))
        return config.key() in ranked or Outlook.of(space, [], None, self.min_speedup).promising(config)

    def propose(self, space: TuningSpace, history: History, k: int) -> list[TuneConfig]:
        if space.approaches == [WEIGHT_ONLY]:  # per-layer bits: the mixed_bits ladder
            from qtune.tuning.strategies.mixed_bits import weight_only_plan

            return weight_only_plan(space, history, max(k, 1))[0][:k]
        return self._plan(space, history, max(k, 1)).todo[:k]

    def goal_reached(self, space: TuningSpace, history: History) -> bool:
        """True only when the search has nothing better to try and a passing config meets the
        objective (see `_goal`)."""
        if space.approaches == [WEIGHT_ONLY]:
            from qtune.tuning.strategies.mixed_bits import weight_only_plan

            todo, complete = weight_only_plan(space, history, 1)
            return complete and not todo and not history.pending() and self._goal(history)
        plan = self._plan(space, history, 1)
        return plan.complete and not plan.todo and not history.pending() and self._goal(history)
