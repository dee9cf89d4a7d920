"""Basic strategy (after LPOT's): default int8 first, then model-wise accuracy-friendly settings,
then fp32 fallback, searched in op-sensitivity order instead of one trial per op.

Stages, each reconstructed from the history alone:
1. default: the preferred int8 config of each approach (static before dynamic for `auto`).
2. variants: the best default with every activation calibrated by another algorithm
   (e.g. percentile, kl): one trial each.
3. fallback: ops sorted by measured sensitivity (most sensitive first); find the smallest n such
   that the base config with the first n ops in fp32 meets the criterion, by bisection
   (k-section when k trials can run at once) over n. A few bad ops among dozens take about
   log2(ops) trials.
4. refine: try to quantize again each op of the fallback set except the most sensitive one,
   least sensitive first, keeping the op quantized when accuracy holds.

Every stage waits for all of its trials before the next proposal (a barrier), so the proposals
do not depend on the order in which parallel trials finish.
"""

from __future__ import annotations

import math
from dataclasses import replace

from qtune.tuning.config import TuneConfig
from qtune.tuning.history import History, TrialRecord
from qtune.tuning.space import TuningSpace
from qtune.tuning.strategies.base import Strategy, strategy_registry


def _accuracy_key(record: TrialRecord) -> float:
    return record.accuracy if (record.ok and record.accuracy is not None) else -math.inf


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
    def _fallback_order(space: TuningSpace, base: TuneConfig) -> list[str]:
        quantized = set(base.quantized_ops())
        return [name for name in space.sensitivity_order() if name in quantized]

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

    def _plan(self, space: TuningSpace, history: History, k: int) -> tuple[list[TuneConfig], bool]:
        """(configs to propose now, search complete)."""
        seen = history.keys()

        def stage(configs: list[TuneConfig]) -> tuple[list[TuneConfig], list[TrialRecord | None]]:
            return [c for c in configs if c.key() not in seen][:k], self._records(history, configs)

        # 1. defaults
        defaults = self._defaults(space)
        todo, records = stage(defaults)
        if todo or any(r is not None and not r.done for r in records):
            return todo, False
        if any(r is not None and r.passed for r in records):
            return [], True
        base = self._best(defaults, records)
        if base is None:  # every default failed to run: nothing to build on
            return [], True

        # 2. model-wise variants of the best default
        variants = self._variants(space, base)
        todo, variant_records = stage(variants)
        if todo or any(r is not None and not r.done for r in variant_records):
            return todo, False
        if any(r is not None and r.passed for r in variant_records):
            return [], True
        base = self._best([base, *variants], [*self._records(history, [base]), *variant_records]) or base

        # 3. bisection over the sensitivity order
        order = self._fallback_order(space, base)
        if not order:
            return [], True
        prefixes = [base.with_fallback(order[:n]) for n in range(len(order) + 1)]
        prefix_records = self._records(history, prefixes)
        if any(r is not None and not r.done for r in prefix_records):
            return [], False
        lo, hi, hi_tested = 0, len(order), False
        for n, record in enumerate(prefix_records):
            if record is None:
                continue
            if record.passed:
                if not hi_tested or n < hi:
                    hi, hi_tested = n, True
            elif n > lo:
                lo = n
        if hi <= lo:  # not monotone (noise): trust the smallest passing prefix above lo
            passing = [n for n, r in enumerate(prefix_records) if r is not None and r.passed and n > lo]
            if not passing:
                return [], True
            hi, hi_tested = min(passing), True
        if hi - lo > 1 or not hi_tested:
            points = sorted({lo + math.ceil(i * (hi - lo) / (k + 1)) for i in range(1, k + 1)})
            points = [n for n in points if lo < n <= hi and not (hi_tested and n == hi)]
            if not points:
                points = [hi]
            return [c for c in (prefixes[n] for n in points) if c.key() not in seen][:k], False

        # 4. refine the fallback set, least sensitive first, one op at a time
        fallback = order[:hi]
        current = prefixes[hi]
        for name in reversed(fallback[1:]):
            candidate = current.with_ops({name: base.ops[name]})
            record = history.find(candidate)
            if record is None:
                return [candidate], False
            if not record.done:
                return [], False
            if record.passed:
                current = candidate
        return [], True

    def propose(self, space: TuningSpace, history: History, k: int) -> list[TuneConfig]:
        return self._plan(space, history, max(k, 1))[0][:k]

    def goal_reached(self, space: TuningSpace, history: History) -> bool:
        return self._plan(space, history, 1)[1]
