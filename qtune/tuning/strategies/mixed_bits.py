"""Mixed-bits strategy for weight-only quantization (approach `weight_only`): per layer 4 bits, 8 bits or fp32.

It starts from the fast end, the space's default config (every eligible MatMul int4, round to nearest, int8
compute), and buys accuracy back where it is cheapest to buy. Each layer climbs the rungs
int4 round to nearest → int4 with a better algorithm → int8 → fp32. The better algorithm (`RUNG_ALGORITHMS`,
the first the layer's space allows) is k-quant, else GPTQ: both write a 4-bit MatMulNBits (k-quant adds zero
points, a little slower at run time), so the rung costs mostly quantization time, and every layer takes it at
once (level 1) instead of one level per layer. k-quant comes first by measurement (examples/minilm_spam/
README.md, "Weight-only algorithms"): on MiniLM at the cosine criterion it raised int4-everywhere from 0.957
to 0.962 and saved one int8 layer (7 instead of 8 of 39), where GPTQ (sym) lowered it to 0.949 and needed
more; GPTQ wins where a layer's error lies in weights its inputs never use (the fragile layers of the digits
MLP in tests/integration/onnxrt: it alone holds them at int4), reachable with weight.algorithm [rtn, gptq].
Then, the layers ranked most sensitive first (the baseline's per-op sensitivity: for ONNX Runtime the
model's output error with that layer alone quantized, see qtune/adaptors/onnxrt/weight_only_sensitivity.py),
it moves the top n layers to 8 bits, then, with every layer at 8 bits, the top m to fp32. The configs form
one ladder of levels, each giving more bits (or a better algorithm) than the one before (R = 1 with the
algorithm rung, 0 when no layer allows one):

    level 0:                  every layer int4, round to nearest
    level 1 (R = 1):          every layer int4 with the better algorithm
    level R + n (0 < n <= N): the n most sensitive layers int8, the rest as at level R
    level R + N + m (0 < m < N): every layer int8, the m most sensitive fp32

Levels are probed 0, R, R+1, R+2, R+4, ... until one passes the criterion, then bisected between the highest
failing and the lowest passing level, so the winner has the fewest layers above 4 bits the ladder allows, in
about 2·log2(N) + 1 trials. Speed is judged by the session as for any strategy (interleaved benchmark,
confirmation, `NoSpeedup`); this strategy only decides which configs are worth measuring. Trial lines and the
report show each trial's weights by dtype and algorithm (`TuneConfig.weights_text`: "37 int4 k_quant, 2 int8 rtn").

The basic strategy (the default) hands a weight-only space to this ladder too, so `strategy: mixed_bits`
only names it explicitly; a space without the weight_only approach is searched as the basic strategy does.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from qtune.tuning.config import OpConfig, TuneConfig
from qtune.tuning.history import History, TrialRecord
from qtune.tuning.space import WEIGHT_ONLY, TuningSpace
from qtune.tuning.strategies.base import strategy_registry
from qtune.tuning.strategies.basic import BasicStrategy

logger = logging.getLogger(__name__)


RUNG_ALGORITHMS = ("k_quant", "gptq")
"""The int4 rung above round to nearest, in preference order (measured: examples/minilm_spam/README.md)."""


def _better_int4(space: TuningSpace, name: str, op_cfg: OpConfig) -> OpConfig | None:
    """The op at int4 with the first rung algorithm its space allows; None when it allows none."""
    assert op_cfg.weight is not None
    for algorithm in RUNG_ALGORITHMS:
        candidate = replace(op_cfg, weight=replace(op_cfg.weight, algorithm=algorithm))
        if space.ops[name].allows(candidate, WEIGHT_ONLY):
            return candidate
    return None


class Ladder:
    """The ladder of levels over a weight-only space (see the module docstring)."""

    def __init__(self, space: TuningSpace) -> None:
        self.base = space.default_config(WEIGHT_ONLY)
        quantized = set(self.base.quantized_ops())
        self.ranked = [name for name in space.sensitivity_order() if name in quantized]
        self.int8: dict[str, OpConfig] = {}
        self.better: dict[str, OpConfig] = {}
        """The ops that take the algorithm rung → their int4 config with it."""
        for name in self.ranked:
            op_cfg = self.base.ops[name]
            assert op_cfg.weight is not None
            wider = replace(op_cfg, weight=replace(op_cfg.weight, dtype="int8"))
            self.int8[name] = wider if space.ops[name].allows(wider, WEIGHT_ONLY) else op_cfg.as_fp32()
            better = _better_int4(space, name, op_cfg) if op_cfg.weight.algorithm not in RUNG_ALGORITHMS else None
            if better is not None:
                self.better[name] = better
        self.rung = 1 if self.better and self.ranked else 0
        """R: 1 when the algorithm rung is a level of its own."""

    @property
    def top(self) -> int:
        """The highest level (every layer int8 but one fp32; all fp32 would be the fp32 model)."""
        return max(2 * len(self.ranked) - 1 + self.rung, 0)

    def config(self, level: int) -> TuneConfig:
        n = len(self.ranked)
        updates: dict[str, OpConfig] = {}
        if self.rung and level >= self.rung:
            updates, level = dict(self.better), level - self.rung
        for index, name in enumerate(self.ranked):
            if level > n and index < level - n:
                updates[name] = self.base.ops[name].as_fp32()
            elif level > n or index < level:
                updates[name] = self.int8[name]
        return self.base.with_ops(updates)

    def probes(self) -> list[int]:
        """Escalation order: 0, R, then R+1, R+2, R+4, ... R+N, then R+N+1, R+N+2, R+N+4, ... up to the top."""
        n = len(self.ranked)
        out = [0, self.rung]
        step = 1
        while step < n:
            out.append(self.rung + step)
            step *= 2
        out.append(self.rung + n)
        step = 1
        while self.rung + n + step < self.top:
            out.append(self.rung + n + step)
            step *= 2
        out.append(self.top)
        return sorted(set(out))


def _passed(record: TrialRecord) -> bool:
    return record.ok and bool(record.passed)


def weight_only_plan(space: TuningSpace, history: History, k: int) -> tuple[list[TuneConfig], bool]:
    """(configs to try now, search complete). A pure function of space and history."""
    ladder = Ladder(space)
    if not ladder.ranked:
        return [], True
    records: dict[int, TrialRecord] = {}
    for level in range(ladder.top + 1):
        record = history.find(ladder.config(level))
        if record is not None:
            records[level] = record
    done = {level: r for level, r in records.items() if r.done}
    passing = [level for level, r in done.items() if _passed(r)]
    lowest_pass = min(passing) if passing else None
    failing = [level for level, r in done.items() if not _passed(r) and (lowest_pass is None or level < lowest_pass)]
    highest_fail = max(failing, default=-1)
    if lowest_pass is None:
        wanted = [level for level in ladder.probes() if level > highest_fail]
    else:
        span = lowest_pass - highest_fail
        if span <= 1:
            return [], True
        wanted = sorted({highest_fail + max(1, round(i * span / (k + 1))) for i in range(1, k + 1)} - {lowest_pass})
    todo = [ladder.config(level) for level in wanted if level not in records][:k]
    pending = any(not r.done for r in records.values())
    if not todo and not pending and lowest_pass is None:
        return [], True  # even the top level failed
    return todo, False


@strategy_registry
class MixedBitsStrategy(BasicStrategy):
    """Per-layer bits for weight-only quantization (module docstring); other spaces: the basic strategy."""

    name = "mixed_bits"

    def propose(self, space: TuningSpace, history: History, k: int) -> list[TuneConfig]:
        if WEIGHT_ONLY not in space.approaches:
            return super().propose(space, history, k)
        return weight_only_plan(space, history, max(k, 1))[0][:k]

    def goal_reached(self, space: TuningSpace, history: History) -> bool:
        if WEIGHT_ONLY not in space.approaches:
            return super().goal_reached(space, history)
        todo, complete = weight_only_plan(space, history, 1)
        return complete and not todo and not history.pending() and self._goal(history)

    def needs_full_evaluation(self, space: TuningSpace, history: History, config: TuneConfig) -> bool:
        return False if WEIGHT_ONLY in space.approaches else super().needs_full_evaluation(space, history, config)
