"""Op-type-restricted configs: quantize only the compute-heavy op types where int8 pays.

All-int8 is where the basic strategy starts, but the speed of int8 lives in a few compute-heavy op
types (Conv, MatMul, Gemm, ...), while every quantized element-wise op costs a Q/DQ pair for little
or no gain and some accuracy (FIELD-NOTES: a conv-recurrent text recogniser passed and ran ~1.5×
faster with only Conv and MatMul in int8, while configs that kept them fp32 and quantized the
element-wise ops ran 0.7–0.9×). Falling back from all-int8 op by op would need dozens of trials to
get there; one restricted config gets there at once.

The compute types are the compute-heavy ones (`space.HEAVY_OP_TYPES`: Conv, MatMul, Gemm, ...) present,
kept when the baseline's op-time profile says int8 makes them faster (all of them without a
profile). For every
non-empty set of them two configs are built:
- *chain*: the set's ops plus what joins them into int8 chains without a Q/DQ boundary: their fused
  partners (the units of `units.py`: a Conv and its Relu), every light chain the adaptor declared whose
  ends are all in the set (`space.light_chains`: a hard-swish between two Convs), and a single light op
  between two int8 ops in graph order; plus any light op the profile says pays by itself;
- *strict*: the set's ops alone, every other op type fp32.

Candidates are ranked by expected speed gained per accuracy risked: the expected gain (share of the
fp32 time saved) discounted by the predicted accuracy loss beyond the criterion's allowance, where
the loss is predicted from the all-int8 default's measured loss scaled by the share of the op
sensitivity the candidate keeps quantized. A candidate equal to a default, one not expected to beat
the speed bar (`outlook.py`), and one predicted to fail about as badly as the failed default (the
compute types hold the sensitivity) are not proposed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from qtune.tuning.config import TuneConfig
from qtune.tuning.criterion import Criterion
from qtune.tuning.history import TrialRecord
from qtune.tuning.space import HEAVY_OP_TYPES, TuningSpace
from qtune.tuning.strategies.outlook import Outlook, allowed_loss, loss
from qtune.tuning.strategies.units import build_units

COMPUTE_SHARE = 0.02
"""With a profile, a compute-heavy op type (`HEAVY_OP_TYPES`) is tried only when it saves at least this share
of the total int8 gain. Light types never qualify as a whole, whatever the profile says: their profiled
gain is mostly Q/DQ placement (on PP-OCRv4's recogniser the profile credited the Adds with 18% of the
gain; the Adds alone in int8 ran 0.68x); single light ops that pay join the chain configs instead."""
PAYING_OP_SHARE = 0.02
"""A light op saving at least this share of the total int8 gain by itself is quantized in chain mode."""
MAX_TYPES = 4
"""At most this many compute types are combined (2^4 − 1 sets); the rest are never quantized here."""
RISK_CUT = 0.5
"""When a default failed, a restricted config predicted to keep more than this share of its loss (and to
fail) is not tried: the compute types themselves hold the sensitivity, and it would fail as well."""
RESTRICTED_TRIALS = 3
"""How many restricted candidates the stage runs (the best-ranked, all at once: a barrier)."""
CHAIN, STRICT = "chain", "strict"


@dataclass(frozen=True)
class Restricted:
    config: TuneConfig
    types: tuple[str, ...]
    mode: str
    gain: float
    """Expected share of the fp32 time saved."""
    risk: float
    """Predicted accuracy loss / allowed loss (0 when nothing is known)."""

    @property
    def score(self) -> float:
        """Expected speed gained per accuracy risked: the gain, discounted by the risk beyond 1."""
        return self.gain / max(1.0, self.risk)

    @property
    def label(self) -> str:
        return f"{'+'.join(self.types)} ({self.mode})"


def _has_profile(space: TuningSpace) -> bool:
    return bool(space.time_share.get("fp32")) and bool(space.time_share.get("int8"))


def compute_types(space: TuningSpace, base: TuneConfig) -> list[str]:
    """The op types of `base`'s quantized ops where int8 pays, most gain first."""
    gains = space.op_gains()
    by_type: dict[str, float] = {}
    for name in base.quantized_ops():
        op_type = space.ops[name].op_type
        by_type[op_type] = by_type.get(op_type, 0.0) + gains.get(name, 0.0)
    types = [t for t in by_type if t in HEAVY_OP_TYPES]
    if _has_profile(space):
        total = sum(g for g in by_type.values() if g > 0)
        types = [t for t in types if total > 0 and by_type[t] > 0 and by_type[t] >= COMPUTE_SHARE * total]
    types.sort(key=lambda t: (-by_type[t], t))
    return types[:MAX_TYPES]


def _chain_members(space: TuningSpace, base: TuneConfig, chosen: set[str]) -> set[str]:
    """`chosen` plus their fused partners, the light chains between them, single light ops between two int8
    ops, and light ops that pay by themselves (light: not compute-heavy; a compute-heavy op is in or out by
    its type alone)."""
    quantized = set(base.quantized_ops())
    light = {n for n in quantized if space.ops[n].op_type not in HEAVY_OP_TYPES}
    members = set(chosen)
    for unit in build_units(space, quantized):
        if members.intersection(unit.names):
            members.update(n for n in unit.names if n in light)
    for chain in space.light_chains:
        if all(end in members for end in chain.ends) and all(name in light for name in chain.ops):
            members.update(chain.ops)
    names = list(space.ops)
    for before, middle, after in zip(names, names[1:], names[2:], strict=False):
        if middle in light and middle not in members and before in members and after in members:
            members.add(middle)
    gains = space.op_gains()
    total = sum(g for n, g in gains.items() if n in quantized and g > 0)
    if _has_profile(space) and total > 0:
        members.update(n for n in light if gains.get(n, 0.0) >= PAYING_OP_SHARE * total)
    return members


def _predicted_risk(space: TuningSpace, base: TuneConfig, config: TuneConfig, base_record: TrialRecord | None,
                    criterion: Criterion | None, baseline: float | None) -> float:
    """The default's measured loss, scaled by the share of its op sensitivity `config` keeps quantized,
    over the allowed loss (0 when the default's loss or the sensitivities are unknown)."""
    if base_record is None or criterion is None or baseline is None or base_record.accuracy is None:
        return 0.0
    lost = loss(base_record.accuracy, baseline, criterion)
    allowed = allowed_loss(criterion, baseline)
    total = sum(max(space.sensitivity.get(n, 0.0), 0.0) for n in base.quantized_ops())
    if lost <= 0 or total <= 0:
        return 0.0
    kept = sum(max(space.sensitivity.get(n, 0.0), 0.0) for n in config.quantized_ops())
    return lost * kept / total / max(allowed, 1e-12)


def _variants(space: TuningSpace, base: TuneConfig, record: TrialRecord | None, subset: tuple[str, ...],
              outlook: Outlook, criterion: Criterion | None, baseline: float | None,
              default_risk: float) -> list[Restricted]:
    """The chain and strict configs of one set of compute types that are worth a trial.

    A chain config that holds a light chain of the adaptor (`space.light_chains`) is kept whenever its strict
    sibling is, even when its predicted risk alone would cut it: the risk is predicted from per-op
    sensitivities measured one op at a time, which overrate the light ops of a chain (PP-OCRv4's recogniser:
    its hard-swish chains held 43% of the measured sensitivity, yet all of them in int8 with the Convs
    passed, and ran 2.1x against the Convs alone's 1.5x at 1 thread)."""
    quantized = set(base.quantized_ops())
    chosen = {n for n in quantized if space.ops[n].op_type in subset}
    variants: dict[str, Restricted] = {}
    for mode, members in ((STRICT, chosen), (CHAIN, _chain_members(space, base, chosen))):
        config = base.with_fallback(sorted(quantized - members))
        if not config.quantized_ops() or not outlook.promising(config):
            continue
        risk = _predicted_risk(space, base, config, record, criterion, baseline)
        rescued = mode == CHAIN and STRICT in variants and any(set(c.ops) <= members for c in space.light_chains)
        if risk > 1.0 and risk > RISK_CUT * default_risk and not rescued:
            continue
        variants[mode] = Restricted(config, subset, mode, outlook.gain(config), risk)
    return list(variants.values())


def restricted_candidates(space: TuningSpace, defaults: list[TuneConfig], records: list[TrialRecord | None],
                          outlook: Outlook, criterion: Criterion | None, baseline: float | None) -> list[Restricted]:
    """Every restricted config of every approach, best-ranked first; only those expected to beat the
    outlook's bar (faster than min_speedup, or clearly faster than the fastest passing config).

    Type sets are ranked by their best variant's score; within a set the variant expected to be faster comes
    first (the chain config on a tie)."""
    seen = {c.key() for c in defaults}
    found: dict[str, Restricted] = {}
    for base, record in zip(defaults, records, strict=True):
        types = compute_types(space, base)
        default_risk = _predicted_risk(space, base, base, record, criterion, baseline)
        for size in range(len(types), 0, -1):
            for subset in itertools.combinations(types, size):
                for variant in _variants(space, base, record, subset, outlook, criterion, baseline, default_risk):
                    key = variant.config.key()
                    if key not in seen and key not in found:
                        found[key] = variant
    order = {approach: i for i, approach in enumerate(space.approaches)}
    best: dict[tuple[tuple[str, ...], str], float] = {}
    for r in found.values():
        group = (r.types, r.config.approach)
        best[group] = max(best.get(group, 0.0), r.score)
    return sorted(found.values(), key=lambda r: (-best[(r.types, r.config.approach)], -len(r.types),
                                                 order.get(r.config.approach, 0), -r.gain, r.mode != CHAIN,
                                                 r.config.key()))
