"""The confirmation's contenders, measured again until the faster one is known (or the passes run out).

The final confirmation (the `confirm` unit) re-measures the few best candidates against fp32 and
each other in one interleaved session. When the winner's interval still overlaps another
candidate's, the two cannot be told apart, and any tie-break would be a guess; the ones that overlap
the fastest (the *contenders*: the only configs that can still win) are measured again, in a session
of their own (fewer models: more rounds each in the same time), and each contender's figures from
all passes are pooled. The runner does this inside the one confirm unit, so a local run and a pod
take the same passes, and the session decides from the pooled figures alone.

Pooling: each pass estimates the same log speedup; the estimates are combined by inverse-variance
weights (the standard error read off each interval, as a normal approximation on the log scale),
with a between-pass variance (DerSimonian–Laird) added when the passes disagree more than their own
intervals allow, e.g. because the machine's load changed between them. So a pass taken on a busy
machine widens the pooled interval rather than shifting it with false confidence.

Pure Python (the operator imports `qtune.tuning`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from statistics import NormalDist

from qtune.protocol import SpeedMeasurement

EXTRA_PASSES = 2
"""At most this many extra measurements of the contenders after the first pass of the confirmation."""

Measure = Callable[[list[str]], dict[str, dict[str, SpeedMeasurement]]]
"""names -> {name: {batch size (str): measurement}}: one interleaved session of those models and fp32."""


def contenders(figures: Mapping[str, SpeedMeasurement]) -> list[str]:
    """The fastest (by point estimate) and every one whose interval overlaps its interval, fastest first."""
    if not figures:
        return []
    ranked = sorted(figures, key=lambda name: (-figures[name].speedup, name))
    top = figures[ranked[0]]
    return [name for name in ranked if figures[name].overlaps(top)]


def pooled(measurements: Sequence[SpeedMeasurement]) -> SpeedMeasurement:
    """One figure from several independent measurements of the same model against fp32 (module docstring).

    The latencies are the rounds-weighted means of the passes' medians, with the candidate's median
    set to fp32 median / pooled speedup, so the printed latencies still divide exactly to the speedup."""
    if not measurements:
        raise ValueError("nothing to pool")
    if len(measurements) == 1:
        return measurements[0]
    last = measurements[-1]
    z = NormalDist().inv_cdf(0.5 + last.confidence / 2.0)
    logs = [math.log(m.speedup) for m in measurements]
    errors = [max((math.log(max(m.high, m.speedup)) - math.log(min(m.low, m.speedup))) / (2.0 * z), 1e-6)
              for m in measurements]
    weights = [1.0 / (e * e) for e in errors]
    fixed = math.fsum(w * x for w, x in zip(weights, logs, strict=True)) / math.fsum(weights)
    q = math.fsum(w * (x - fixed) ** 2 for w, x in zip(weights, logs, strict=True))
    spread = math.fsum(weights) - math.fsum(w * w for w in weights) / math.fsum(weights)
    between = max(0.0, (q - (len(logs) - 1)) / spread) if spread > 0 else 0.0
    weights = [1.0 / (e * e + between) for e in errors]
    centre = math.fsum(w * x for w, x in zip(weights, logs, strict=True)) / math.fsum(weights)
    error = math.sqrt(1.0 / math.fsum(weights))
    rounds = [max(m.rounds, 1) for m in measurements]

    def mean(values: list[float]) -> float:
        return math.fsum(r * v for r, v in zip(rounds, values, strict=True)) / sum(rounds)

    speedup = math.exp(centre)
    fp32_p50 = mean([m.fp32_p50_ms for m in measurements])
    p50 = fp32_p50 / speedup
    return last.model_copy(update={
        "speedup": speedup, "low": math.exp(centre - z * error), "high": math.exp(centre + z * error),
        "fp32_p50_ms": fp32_p50, "p50_ms": p50,
        "fp32_p90_ms": mean([m.fp32_p90_ms for m in measurements]),
        "p90_ms": p50 * mean([m.p90_ms / m.p50_ms if m.p50_ms > 0 else 1.0 for m in measurements]),
        "rounds": sum(m.rounds for m in measurements),
        "runs_per_window": max(m.runs_per_window for m in measurements),
        "seconds": round(math.fsum(m.seconds for m in measurements), 3),
        "cpu_clock": all(m.cpu_clock for m in measurements),
    })


def confirm_rounds(measure: Measure, candidates: list[str], batch: str,
                   extra_passes: int = EXTRA_PASSES) -> dict[str, dict[str, SpeedMeasurement]]:
    """Measure `candidates`, then, while at `batch` (the one that decides) the fastest still overlaps
    another, measure those contenders again and pool; returns the pooled figures of every candidate."""
    passes: dict[str, dict[str, list[SpeedMeasurement]]] = {}

    def take(names: list[str]) -> None:
        for name, by_batch in measure(names).items():
            for size, measurement in by_batch.items():
                passes.setdefault(name, {}).setdefault(size, []).append(measurement)

    def current() -> dict[str, dict[str, SpeedMeasurement]]:
        return {name: {size: pooled(ms) for size, ms in by_batch.items()} for name, by_batch in passes.items()}

    take(list(candidates))
    for _ in range(extra_passes):
        figures = {name: by_batch[batch] for name, by_batch in current().items() if batch in by_batch}
        close = contenders(figures)
        if len(close) < 2:
            break
        take(close)
    return current()
