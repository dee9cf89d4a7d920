"""Random: per-op settings drawn from the space, reproducible from (seed, trial number)."""

from __future__ import annotations

import random

from qtune.tuning.config import TuneConfig
from qtune.tuning.history import History
from qtune.tuning.space import TuningSpace
from qtune.tuning.strategies.base import Strategy, strategy_registry

FALLBACK_PROBABILITY = 0.15
_MAX_DRAWS = 200


@strategy_registry
class RandomStrategy(Strategy):
    name = "random"

    def draw(self, space: TuningSpace, number: int) -> TuneConfig:
        rng = random.Random(f"{self.seed}:{number}")
        approach = rng.choice(space.approaches)
        config = space.default_config(approach)
        updates = {}
        for name, op in space.ops.items():
            choices = op.choices(approach)
            if not choices:
                continue
            updates[name] = op.fp32() if rng.random() < FALLBACK_PROBABILITY else rng.choice(choices)
        return config.with_ops(updates)

    def propose(self, space: TuningSpace, history: History, k: int) -> list[TuneConfig]:
        seen = history.keys()
        out: list[TuneConfig] = []
        number = len(history.trials)
        for _ in range(_MAX_DRAWS):
            if len(out) >= k:
                break
            # the first trial is the default config, as in every strategy
            config = space.default_config() if number == 0 else self.draw(space, number)
            number += 1
            if config.key() not in seen:
                seen.add(config.key())
                out.append(config)
        return out
