"""Exhaustive: every combination of per-op-type settings (fp32 included), default first."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from qtune.tuning.config import OpConfig, TuneConfig
from qtune.tuning.history import History
from qtune.tuning.space import TuningSpace
from qtune.tuning.strategies.base import Strategy, fresh, strategy_registry


def _configs(space: TuningSpace) -> Iterator[TuneConfig]:
    for approach in space.approaches:
        base = space.default_config(approach)
        yield base
        types: dict[str, list[str]] = {}
        for name, op in space.ops.items():
            if op.quantizable(approach):
                types.setdefault(op.op_type, []).append(name)
        type_names = list(types)
        # options of an op type: the settings of its first op, then fp32 fallback
        options: list[list[OpConfig | None]] = [
            [*space.ops[types[t][0]].choices(approach), None] for t in type_names
        ]
        for combo in itertools.product(*options):
            updates: dict[str, OpConfig] = {}
            for op_type, choice in zip(type_names, combo, strict=True):
                for name in types[op_type]:
                    op = space.ops[name]
                    if choice is None:
                        updates[name] = op.fp32()
                    elif choice in op.choices(approach):
                        updates[name] = choice
            yield base.with_ops(updates)


@strategy_registry
class ExhaustiveStrategy(Strategy):
    name = "exhaustive"

    def propose(self, space: TuningSpace, history: History, k: int) -> list[TuneConfig]:
        return fresh(_configs(space), history, k)
