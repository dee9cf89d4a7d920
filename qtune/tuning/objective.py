"""Objectives and the choice of the best trial.

The choice is independent of the order in which results arrived, so a parallel run picks the
same winner as a sequential one. Latency is noisy on shared machines: latencies within
`latency_tolerance` of the fastest passing trial count as equal, and among equals the config
with the fewest fp32 ops wins (then the faster, then the config key).
"""

from __future__ import annotations

from qtune.tuning.history import History, TrialRecord


def objective_value(record: TrialRecord, objective: str, batch_size: int | None = None) -> float:
    if objective == "size":
        return float(record.model_size_bytes or 0)
    latency = record.latency(batch_size)
    return float("inf") if latency is None else latency


def select_best(history: History, objective: str, latency_tolerance: float = 0.05,
                batch_size: int | None = None) -> TrialRecord | None:
    passing = [t for t in history.trials if t.ok and t.passed]
    if not passing:
        return None

    def fp32_count(record: TrialRecord) -> int:
        return len(record.config.fp32_ops())

    if objective == "size":
        return min(passing, key=lambda t: (objective_value(t, "size"), fp32_count(t), t.config_key))
    fastest = min(objective_value(t, objective, batch_size) for t in passing)
    near = [t for t in passing if objective_value(t, objective, batch_size) <= fastest * (1 + latency_tolerance)]
    return min(near, key=lambda t: (fp32_count(t), objective_value(t, objective, batch_size), t.config_key))
