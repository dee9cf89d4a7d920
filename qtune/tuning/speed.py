"""The speedup of a model over fp32 and its confidence interval, from interleaved rounds of timings.

A measurement is a list of *rounds*; in each round every model ran one short window of runs, close
together in time. Load on a shared machine comes in bursts that last longer than a window, so the
rounds, not the single runs, are the independent units: the interval comes from a bootstrap that
resamples whole rounds (the fp32 and the candidate window of a round stay paired). A burst that hit
some rounds then shows up as disagreement between rounds, i.e. a wider interval, not a shifted one.
A load state that outlasts many rounds (a busy sibling core for seconds) makes successive rounds
alike; the bootstrap then resamples runs of consecutive rounds (`block_length`), so a few states
count as a few readings, not as many.

Pure Python (no numpy): the operator imports `qtune.tuning`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from itertools import chain
from statistics import NormalDist

__all__ = ["block_length", "median", "percentile", "speedup_interval", "student_t_quantile"]

# Inside the bootstrap each round is summarised by a few evenly spaced quantiles of its window (the
# point estimate always uses every run): about this many values per resample in all, 8 to 32 per
# round. One resample's cost then hardly depends on window length or round count.
_BOOTSTRAP_POINTS = 1024
# Below this many rounds the bootstrap alone is too narrow (see _with_round_ratio_interval).
_FEW_ROUNDS = 5


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (mean of the two middle values for even lengths)."""
    return percentile(values, 50.0)


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100), linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    ordered = sorted(values)
    return _sorted_percentile(ordered, q)


def _sorted_percentile(ordered: Sequence[float], q: float) -> float:
    position = (len(ordered) - 1) * min(max(q, 0.0), 100.0) / 100.0
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    fraction = position - below
    if fraction == 0.0:
        return float(ordered[below])
    return float(ordered[below] + (ordered[above] - ordered[below]) * fraction)


def _t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer `df` (Abramowitz & Stegun 26.7.3/26.7.4)."""
    theta = math.atan(abs(t) / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    s = math.sin(theta)
    if df % 2 == 1:
        total, term = 0.0, 1.0
        if df > 1:
            total = term = 1.0
            for k in range(1, (df - 3) // 2 + 1):
                term *= c2 * (2 * k) / (2 * k + 1)
                total += term
            total *= s * math.cos(theta)
        return min(1.0, 2.0 / math.pi * (theta + total))
    total = term = 1.0
    for k in range(1, (df - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return min(1.0, s * total)


def student_t_quantile(p: float, df: int) -> float:
    """The `p` quantile (0.5 <= p < 1) of Student's t with integer `df` >= 1, by bisection."""
    if not 0.5 <= p < 1.0:
        raise ValueError("p must be in [0.5, 1)")
    target = 2.0 * p - 1.0
    low, high = 0.0, 1.0
    while _t_two_sided_mass(high, df) < target:
        high *= 2.0
    for _ in range(100):
        middle = (low + high) / 2.0
        if _t_two_sided_mass(middle, df) < target:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


def _expanded_tail(confidence: float, rounds: int) -> float:
    """Tail probability for the percentile interval, widened for few rounds.

    A plain percentile bootstrap is too narrow when there are few resampling units (5 rounds give
    ~85% coverage for a nominal 95%). Hesterberg's "expanded percentile interval" (2015) corrects
    it: use the tail Φ(-sqrt(n/(n-1)) · t_{n-1}) instead of α/2. It tends to α/2 as n grows."""
    alpha = 1.0 - confidence
    if rounds < 2:
        return alpha / 2.0
    t = student_t_quantile(1.0 - alpha / 2.0, rounds - 1)
    return NormalDist().cdf(-math.sqrt(rounds / (rounds - 1)) * t)


def _summary(window: Sequence[float], points: int) -> list[float]:
    """A window's times, or `points` evenly spaced quantiles of them when it is longer (sorted)."""
    ordered = sorted(window)
    if len(ordered) <= points:
        return ordered
    return [_sorted_percentile(ordered, 100.0 * (j + 0.5) / points) for j in range(points)]


def _pooled_median(rounds: Sequence[list[float]], picks: Sequence[int]) -> float:
    pooled = list(chain.from_iterable(map(rounds.__getitem__, picks)))
    pooled.sort()  # the rounds are pre-sorted runs: timsort merges them
    return _sorted_percentile(pooled, 50.0)


def _round_log_ratios(fp32_rounds: Sequence[Sequence[float]], cand_rounds: Sequence[Sequence[float]]) -> list[float]:
    return [math.log(_ratio(median(f), median(c))) for f, c in zip(fp32_rounds, cand_rounds, strict=True)]


def _circular_blocks(rng: random.Random, n: int, block: int) -> list[int]:
    """n round indices: whole runs of `block` consecutive rounds from random starts, wrapping around."""
    if block <= 1:
        return rng.choices(range(n), k=n)
    picks: list[int] = []
    while len(picks) < n:
        start = rng.randrange(n)
        picks.extend((start + j) % n for j in range(block))
    return picks[:n]


def _flat_top(x: float) -> float:
    x = abs(x)
    return 1.0 if x <= 0.5 else 2.0 * (1.0 - x) if x <= 1.0 else 0.0


def block_length(series: Sequence[float]) -> int:
    """Block length for a circular block bootstrap of `series` (Politis & White 2004, Patton et al.
    2009): 1 when successive rounds are independent, longer when load states outlast rounds.

    Resampling single rounds assumes that a round says nothing about the next. On a shared machine
    a load state (another process on the sibling core, a scheduler time-slicing us) can last
    seconds, i.e. tens of rounds, and shift the ratio while it lasts; resampling runs of rounds
    then keeps that persistence, and the interval widens with it. Computed on the ranks of the
    series: a state switch between the two windows of a round gives that round an extreme ratio,
    and a few such rounds would otherwise hide the persistence."""
    n = len(series)
    if n < 8:
        return 1
    order = sorted(range(n), key=series.__getitem__)
    ranks = [0.0] * n
    for rank, index in enumerate(order):
        ranks[index] = float(rank)
    mean = (n - 1) / 2.0
    centered = [x - mean for x in ranks]
    variance = math.fsum(c * c for c in centered) / n
    if variance <= 0.0:
        return 1
    k_n = max(5, math.ceil(math.sqrt(math.log10(n))))
    m_max = min(n - 1 - k_n, math.ceil(math.sqrt(n)) + k_n)
    if m_max < 1:
        return 1
    autocov = [math.fsum(centered[i] * centered[i + k] for i in range(n - k)) / n for k in range(m_max + k_n + 1)]
    threshold = 2.0 * math.sqrt(math.log10(n) / n)
    m_hat = next((m for m in range(m_max + 1)
                  if all(abs(autocov[m + j] / variance) < threshold for j in range(1, k_n + 1))), m_max)
    if m_hat == 0:  # no significant autocorrelation at any lag: independent rounds
        return 1
    big_m = min(2 * max(m_hat, 1), m_max)
    g = 2.0 * math.fsum(_flat_top(k / big_m) * k * autocov[k] for k in range(1, big_m + 1))
    spectrum = autocov[0] + 2.0 * math.fsum(_flat_top(k / big_m) * autocov[k] for k in range(1, big_m + 1))
    if spectrum <= 0.0:
        return 1
    length = (2.0 * g * g / (4.0 / 3.0 * spectrum * spectrum)) ** (1.0 / 3.0) * n ** (1.0 / 3.0)
    return max(1, min(round(length), n // 3))


def speedup_interval(fp32_rounds: list[list[float]], cand_rounds: list[list[float]],
                     confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(speedup, low, high) of a candidate over fp32 from paired rounds of timings.

    `fp32_rounds[i]` and `cand_rounds[i]` are the run times of round i's two windows. The point is
    median(all fp32 times) / median(all candidate times), so latencies printed beside it divide
    exactly to it. The interval resamples rounds with replacement (keeping each round's pair
    together; runs of consecutive rounds when the per-round ratios are autocorrelated, see
    `block_length`), recomputes the pooled-median ratio, and takes percentiles expanded for small
    numbers of (blocks of) rounds. Deterministic for a given `seed`. One round: the point alone."""
    if len(fp32_rounds) != len(cand_rounds):
        raise ValueError(f"rounds are not paired: {len(fp32_rounds)} fp32 vs {len(cand_rounds)} candidate")
    if not fp32_rounds or any(not r for r in fp32_rounds) or any(not r for r in cand_rounds):
        raise ValueError("every round needs at least one timing of each model")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")
    fp32_all = [t for window in fp32_rounds for t in window]
    cand_all = [t for window in cand_rounds for t in window]
    point = _ratio(median(fp32_all), median(cand_all))
    n = len(fp32_rounds)
    if n < 2 or resamples < 1:
        return point, point, point
    points = min(32, max(8, _BOOTSTRAP_POINTS // n))
    fp32_summary = [_summary(window, points) for window in fp32_rounds]
    cand_summary = [_summary(window, points) for window in cand_rounds]
    block = block_length(_round_log_ratios(fp32_rounds, cand_rounds))
    rng = random.Random(seed)
    ratios: list[float] = []
    for _ in range(resamples):
        picks = _circular_blocks(rng, n, block)
        ratios.append(_ratio(_pooled_median(fp32_summary, picks), _pooled_median(cand_summary, picks)))
    ratios.sort()
    tail = 100.0 * _expanded_tail(confidence, max(2, round(n / block)))
    low = _sorted_percentile(ratios, tail)
    high = _sorted_percentile(ratios, 100.0 - tail)
    if n < _FEW_ROUNDS:
        low, high = _with_round_ratio_interval(low, high, fp32_rounds, cand_rounds, confidence)
    # The summaries may move the bootstrap's centre by a hair: the interval always holds the point.
    return point, min(low, point), max(high, point)


def _with_round_ratio_interval(low: float, high: float, fp32_rounds: list[list[float]],
                               cand_rounds: list[list[float]], confidence: float) -> tuple[float, float]:
    """Widen [low, high] to also hold the Student-t interval of the per-round log speedups.

    With 3 or 4 rounds a bootstrap sees only a handful of distinct resamples and its interval
    cannot be wider than the spread of the rounds (3 rounds: about 75% coverage whatever the
    nominal level); the t interval accounts for having so few rounds."""
    logs = _round_log_ratios(fp32_rounds, cand_rounds)
    n = len(logs)
    mean = math.fsum(logs) / n
    spread = math.sqrt(math.fsum((x - mean) ** 2 for x in logs) / (n - 1))
    margin = student_t_quantile(1.0 - (1.0 - confidence) / 2.0, n - 1) * spread / math.sqrt(n)
    return min(low, math.exp(mean - margin)), max(high, math.exp(mean + margin))


def _ratio(numerator: float, denominator: float) -> float:
    if denominator <= 0.0:
        return math.inf if numerator > 0.0 else 1.0
    return numerator / denominator
