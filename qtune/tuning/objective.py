"""Objectives and the choice of the best trial.

The choice is independent of the order in which results arrived, so a parallel run picks the
same winner as a sequential one. Measurements are noisy (latency on a shared machine) or differ
by a few Q/DQ nodes (size): objective values within `objective_tolerance` of the best passing
trial count as equal, and among equals the config with the fewest fp32 ops wins (then the better
value, then the config key).
"""

from __future__ import annotations

from qtune.tuning.history import History, TrialRecord


def objective_value(record: TrialRecord, objective: str, batch_size: int | None = None) -> float:
    """Lower is better. Latency is taken relative to the fp32 model measured interleaved in the same
    trial when available (robust to the machine's load changing between trials)."""
    if objective == "size":
        return float(record.model_size_bytes or 0)
    latency = record.latency(batch_size)
    if latency is None:
        return float("inf")
    fp32 = record.fp32_latency_ms.get(record.batch_key(batch_size) or "")
    return latency / fp32 if fp32 else latency


def select_best(history: History, objective: str, objective_tolerance: float = 0.05,
                batch_size: int | None = None) -> TrialRecord | None:
    passing = [t for t in history.trials if t.ok and t.passed]
    if not passing:
        return None

    def fp32_count(record: TrialRecord) -> int:
        return len(record.config.fp32_ops())

    best_value = min(objective_value(t, objective, batch_size) for t in passing)
    near = [t for t in passing if objective_value(t, objective, batch_size) <= best_value * (1 + objective_tolerance)]
    return min(near, key=lambda t: (fp32_count(t), objective_value(t, objective, batch_size), t.config_key))
