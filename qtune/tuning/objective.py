"""Objectives and the choice of the best trial.

The choice depends only on the recorded figures, never on the order results arrived in, so a
parallel run, a sequential run and a resumed run pick the same winner from the same figures.

- `latency`: a trial's figure is its speedup over fp32 with a confidence interval, both models
  measured interleaved in one process. Before anything is called a tie, the final confirmation
  re-measures the best point estimates in one session and measures again the ones whose intervals
  still overlap the fastest (`contenders.py`); when it ran, only its candidates and its (pooled)
  figures decide. Configs whose intervals then still overlap the fastest one's are equal in speed:
  among them the higher accuracy wins, then the higher speedup, then the config key. Fewer fp32 ops
  is no tie-break: it is not a proxy for speed (an int8 element-wise op costs Q/DQ, saves nothing).
- `size`: sizes within `objective_tolerance` of the smallest count as equal; among equals the fewest
  fp32 ops win (for size they are a proxy: an fp32 op keeps its fp32 weights), then the higher
  accuracy, then the config key.
"""

from __future__ import annotations

from qtune.protocol import SUCCEEDED, SpeedMeasurement
from qtune.tuning.criterion import Criterion
from qtune.tuning.history import History, TrialRecord, default_speed_key


def _tie_key(record: TrialRecord, criterion: Criterion | None) -> tuple[int, float, str]:
    accuracy = record.accuracy if record.accuracy is not None else float("nan")
    if accuracy != accuracy:
        goodness = float("inf")
    elif criterion is None or criterion.higher_is_better:
        goodness = -accuracy
    else:
        goodness = accuracy
    return len(record.tune_config.fp32_ops()), goodness, record.config_key


def confirmed_speed(history: History, index: int, batch_size: int | str) -> SpeedMeasurement | None:
    """The confirmation's figure of trial `index` at `batch_size`, if the confirmation measured it."""
    confirmation = history.confirmation
    if confirmation is None or confirmation.status != SUCCEEDED:
        return None
    return confirmation.speed.get(str(index), {}).get(str(batch_size))


def confirmed_candidates(history: History) -> list[int]:
    confirmation = history.confirmation
    if confirmation is None or confirmation.status != SUCCEEDED:
        return []
    return [int(i) for i in confirmation.speed]


def speed_of(history: History, record: TrialRecord, batch_size: int | str) -> SpeedMeasurement | None:
    """The figure that decides for `record`: the confirmation's when it has one, else the trial's."""
    return confirmed_speed(history, record.index, batch_size) or record.speed_at(batch_size)


def rank_by_speed(history: History, records: list[TrialRecord], batch_size: int | str,
                  criterion: Criterion | None = None) -> list[TrialRecord]:
    """Best first, by the deciding figure (the confirmation's when it has one): the group whose intervals
    overlap the fastest one's (equal in speed within measurement doubt) ordered by higher accuracy, then
    higher speedup, then the config key; then the rest by the same procedure applied again
    (deterministic whatever order results arrived in). Records without a figure last."""
    def figure(record: TrialRecord) -> SpeedMeasurement:
        measured = speed_of(history, record, batch_size)
        assert measured is not None
        return measured

    def among_equals(record: TrialRecord) -> tuple[float, float, str]:
        return _tie_key(record, criterion)[1], -figure(record).speedup, record.config_key

    measured = [r for r in records if speed_of(history, r, batch_size) is not None]
    ranked: list[TrialRecord] = []
    while measured:
        top = figure(max(measured, key=lambda r: (figure(r).speedup, r.config_key)))
        equal = sorted((r for r in measured if figure(r).overlaps(top)), key=among_equals)
        ranked.extend(equal)
        measured = [r for r in measured if r not in equal]
    unmeasured = sorted((r for r in records if speed_of(history, r, batch_size) is None),
                        key=lambda r: _tie_key(r, criterion))
    return ranked + unmeasured


def select_best(history: History, objective: str, objective_tolerance: float = 0.05,
                batch_size: int | str | None = None, criterion: Criterion | None = None) -> TrialRecord | None:
    passing = [t for t in history.trials if t.ok and t.passed]
    if not passing:
        return None
    if objective == "size":
        smallest = min(float(t.model_size_bytes or 0) for t in passing)
        near = [t for t in passing if float(t.model_size_bytes or 0) <= smallest * (1 + objective_tolerance)]
        return min(near, key=lambda t: _tie_key(t, criterion))
    batch = batch_size if batch_size is not None else _largest_batch(passing)
    confirmed = set(confirmed_candidates(history))
    pool = [t for t in passing if t.index in confirmed] or passing
    return rank_by_speed(history, pool, batch, criterion)[0] if batch is not None else \
        min(pool, key=lambda t: _tie_key(t, criterion))


def _largest_batch(records: list[TrialRecord]) -> str | None:
    return default_speed_key({k for r in records for k in r.speed})
