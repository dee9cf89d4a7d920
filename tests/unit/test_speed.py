"""The speedup interval (qtune.tuning.speed) and the interleaved measurement (qtune.runner.benchmark).

Most tests run on a simulated machine: a fake clock that runners advance by their cost times the
machine's load, which comes in bursts. That makes them deterministic and fast while exercising
exactly the conditions the measurement must survive; one test measures real CPU work."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

import pytest

from qtune.runner.benchmark import WINDOW_SECONDS, measure_speed, run_clock, summary
from qtune.spec.models import BenchmarkSpec
from qtune.tuning.speed import block_length, median, percentile, speedup_interval, student_t_quantile

TRUE_RATIO = 2.0


# --- a simulated noisy machine -----------------------------------------------------------------
class Machine:
    """Simulated time. A run costs `cost × load × jitter`; the load is 1 except during bursts
    (factor 1.5–3×) that start at random and last `burst_ms` on average; rare spikes add more."""

    def __init__(self, seed: int, jitter: float = 0.05, burst_every_ms: float = 300.0,
                 burst_ms: float = 100.0, spike_p: float = 0.02) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.load = 1.0
        self.jitter, self.burst_every, self.burst_ms, self.spike_p = jitter, burst_every_ms, burst_ms, spike_p
        self.calls: list[str] = []

    def clock(self) -> float:
        return self.now

    def run_for(self, cost_ms: float) -> float:
        took = cost_ms * self.load * math.exp(self.rng.gauss(0.0, self.jitter))
        if self.rng.random() < self.spike_p:
            took *= 1.0 + self.rng.expovariate(1.0)
        self.now += took / 1000.0
        if self.load == 1.0:
            if self.burst_every and self.rng.random() < 1.0 - math.exp(-took / self.burst_every):
                self.load = self.rng.uniform(1.5, 3.0)
        elif self.rng.random() < 1.0 - math.exp(-took / self.burst_ms):
            self.load = 1.0
        return took

    def runner(self, name: str, cost_ms: float) -> Callable[[], None]:
        def run() -> None:
            self.calls.append(name)
            self.run_for(cost_ms)
        return run

    def rounds(self, count: int, runs: int, fp32_ms: float = 2.0,
               cand_ms: float = 2.0 / TRUE_RATIO) -> tuple[list[list[float]], list[list[float]]]:
        """`count` interleaved rounds (order alternating) of `runs` runs per window."""
        fp32: list[list[float]] = []
        cand: list[list[float]] = []
        for index in range(count):
            order = [(fp32, fp32_ms), (cand, cand_ms)]
            for target, cost in order if index % 2 == 0 else order[::-1]:
                target.append([self.run_for(cost) for _ in range(runs)])
        return fp32, cand


NOISE = {
    "steady": {"burst_every_ms": 0.0},
    "bursty": {},
    "frequent-bursts": {"burst_every_ms": 100.0, "burst_ms": 60.0},
    "long-bursts-heavy-jitter": {"burst_every_ms": 50.0, "burst_ms": 200.0, "jitter": 0.2},
}


# --- the interval --------------------------------------------------------------------------------
def test_median_and_percentile_interpolate_like_numpy() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert percentile([5.0], 90) == 5.0
    with pytest.raises(ValueError):
        median([])


@pytest.mark.parametrize(("df", "expected"), [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)])
def test_student_t_quantiles(df: int, expected: float) -> None:
    assert student_t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)


def test_point_is_the_ratio_of_pooled_medians_exactly() -> None:
    fp32, cand = Machine(seed=3).rounds(7, 13)
    point, low, high = speedup_interval(fp32, cand)
    fp32_p50 = median([t for w in fp32 for t in w])
    cand_p50 = median([t for w in cand for t in w])
    assert point == fp32_p50 / cand_p50
    assert low <= point <= high


def test_interval_is_deterministic_for_a_seed() -> None:
    fp32, cand = Machine(seed=4).rounds(8, 10)
    assert speedup_interval(fp32, cand, seed=1) == speedup_interval(fp32, cand, seed=1)
    other = speedup_interval(fp32, cand, seed=2)
    assert other[0] == speedup_interval(fp32, cand, seed=1)[0]  # the point does not depend on the seed


@pytest.mark.parametrize("noise", sorted(NOISE))
@pytest.mark.parametrize(("rounds", "runs"), [(3, 10), (5, 10), (12, 20)])
def test_interval_covers_the_true_ratio(noise: str, rounds: int, runs: int) -> None:
    """Over many simulated measurements, a 95% interval holds the true ratio about 95% of the time,
    whether the load is steady or bursty (the plain percentile bootstrap gets ~75% with 3 rounds)."""
    draws = 150
    hits = 0
    for seed in range(draws):
        fp32, cand = Machine(seed=seed, **NOISE[noise]).rounds(rounds, runs)
        _, low, high = speedup_interval(fp32, cand, resamples=300, seed=seed)
        hits += low <= TRUE_RATIO <= high
    assert hits / draws >= 0.88, f"coverage {hits / draws:.2f}"


def _median_width(noise: dict, rounds: int = 8, runs: int = 10, draws: int = 40) -> float:
    widths = []
    for seed in range(draws):
        fp32, cand = Machine(seed=seed, **noise).rounds(rounds, runs)
        point, low, high = speedup_interval(fp32, cand, resamples=300, seed=seed)
        widths.append((high - low) / point)
    return median(widths)


def test_noisier_machine_gives_a_wider_interval() -> None:
    quiet = _median_width({"burst_every_ms": 0.0, "jitter": 0.02, "spike_p": 0.0})
    jittery = _median_width({"burst_every_ms": 0.0, "jitter": 0.2, "spike_p": 0.0})
    bursty = _median_width({"burst_every_ms": 100.0, "burst_ms": 60.0, "jitter": 0.02})
    assert jittery > 2 * quiet
    assert bursty > 2 * quiet


def test_a_burst_on_one_side_widens_the_interval_instead_of_moving_it() -> None:
    """Two rounds where only the candidate's window hit a 3× burst: a pooled ratio without
    uncertainty would read a lower speedup; the interval still holds the true one and says why."""
    machine = Machine(seed=11, burst_every_ms=0.0, jitter=0.03, spike_p=0.0)
    fp32, cand = machine.rounds(10, 20)
    clean = speedup_interval(fp32, cand)
    for index in (2, 3):
        cand[index] = [t * 3.0 for t in cand[index]]
    point, low, high = speedup_interval(fp32, cand)
    assert low <= TRUE_RATIO <= high
    assert high - low > 2 * (clean[2] - clean[1])


def test_more_rounds_narrow_the_interval() -> None:
    few = _median_width(NOISE["bursty"], rounds=5)
    many = _median_width(NOISE["bursty"], rounds=40)
    assert many < few / 2


def test_interval_rejects_unpaired_or_empty_rounds() -> None:
    with pytest.raises(ValueError):
        speedup_interval([[1.0], [1.0]], [[1.0]])
    with pytest.raises(ValueError):
        speedup_interval([[1.0], []], [[1.0], [1.0]])
    assert speedup_interval([[2.0, 2.0]], [[1.0, 1.0]]) == (2.0, 2.0, 2.0)  # one round: no spread known


# --- the interleaved measurement -----------------------------------------------------------------
def _settings(**overrides: float) -> BenchmarkSpec:
    values = {"warmup_runs": 3, "runs": 20, "min_rounds": 5, "max_seconds": 20.0, "target_precision": 0.05}
    values.update(overrides)
    return BenchmarkSpec(**values)


def test_measure_speed_on_a_bursty_machine_holds_the_true_ratio() -> None:
    hits = 0
    for seed in range(20):
        machine = Machine(seed=seed)
        runners = {"fp32": machine.runner("fp32", 2.0), "int8": machine.runner("int8", 1.0),
                   "slow": machine.runner("slow", 4.0)}
        result = measure_speed(runners, "fp32", batch_size=8, settings=_settings(), threads=2, clock=machine.clock)
        assert set(result) == {"int8", "slow"}
        int8, slow = result["int8"], result["slow"]
        assert int8.speedup == int8.fp32_p50_ms / int8.p50_ms
        assert int8.fp32_p50_ms == slow.fp32_p50_ms  # one session: the same fp32 windows
        assert int8.rounds == slow.rounds >= 5 and int8.threads == 2 and int8.batch_size == 8
        assert int8.runs_per_window * int8.rounds >= 20
        assert int8.p90_ms >= int8.p50_ms
        hits += (int8.low <= 2.0 <= int8.high) + (slow.low <= 0.5 <= slow.high)
    assert hits >= 0.88 * 40


def test_window_lasts_about_75_ms_of_the_slowest_model() -> None:
    machine = Machine(seed=1, burst_every_ms=0.0, jitter=0.0, spike_p=0.0)
    runners = {"fp32": machine.runner("fp32", 2.0), "int8": machine.runner("int8", 0.5)}
    result = measure_speed(runners, "fp32", batch_size=1, settings=_settings(), threads=1, clock=machine.clock)
    assert result["int8"].runs_per_window == round(WINDOW_SECONDS / 0.002)


def test_warm_up_then_rounds_in_rotated_order() -> None:
    machine = Machine(seed=2, burst_every_ms=0.0, jitter=0.0, spike_p=0.0)
    names = ["fp32", "a", "b"]
    runners = {name: machine.runner(name, 25.0) for name in names}  # 3 runs per window
    measure_speed(runners, "fp32", batch_size=1, settings=_settings(warmup_runs=4, runs=1), threads=1,
                  clock=machine.clock)
    assert machine.calls[:12] == ["fp32"] * 4 + ["a"] * 4 + ["b"] * 4
    windows = machine.calls[12::3]
    assert machine.calls[12:] == [name for name in windows for _ in range(3)]
    assert windows[:9] == ["fp32", "a", "b", "a", "b", "fp32", "b", "fp32", "a"]


def test_stops_after_min_rounds_when_already_precise() -> None:
    machine = Machine(seed=5, burst_every_ms=0.0, jitter=0.01, spike_p=0.0)
    runners = {"fp32": machine.runner("fp32", 2.0), "int8": machine.runner("int8", 1.0)}
    result = measure_speed(runners, "fp32", batch_size=1, settings=_settings(), threads=1, clock=machine.clock)
    assert result["int8"].rounds == 5
    assert result["int8"].seconds < 2.0


def test_adds_rounds_until_every_model_has_its_runs() -> None:
    machine = Machine(seed=5, burst_every_ms=0.0, jitter=0.01, spike_p=0.0)
    runners = {"fp32": machine.runner("fp32", 2.0), "int8": machine.runner("int8", 1.0)}
    result = measure_speed(runners, "fp32", batch_size=1, settings=_settings(runs=500), threads=1,
                           clock=machine.clock)["int8"]
    assert result.rounds * result.runs_per_window >= 500
    assert (result.rounds - 1) * result.runs_per_window < 500


def test_noisy_machine_adds_rounds_but_respects_the_budget() -> None:
    machine = Machine(seed=6, burst_every_ms=20.0, burst_ms=80.0, jitter=0.4)
    runners = {"fp32": machine.runner("fp32", 2.0), "int8": machine.runner("int8", 1.9)}
    settings = _settings(max_seconds=4.0, target_precision=0.002)
    result = measure_speed(runners, "fp32", batch_size=1, settings=settings, threads=1, clock=machine.clock)["int8"]
    assert result.rounds > 5
    assert result.seconds <= 4.0 * 1.05
    assert result.low < result.speedup < result.high


def test_min_rounds_win_over_the_budget() -> None:
    machine = Machine(seed=7, burst_every_ms=0.0)
    runners = {"fp32": machine.runner("fp32", 200.0), "int8": machine.runner("int8", 100.0)}
    result = measure_speed(runners, "fp32", batch_size=1, settings=_settings(max_seconds=0.5, min_rounds=4),
                           threads=1, clock=machine.clock)["int8"]
    assert result.rounds == 4 and result.runs_per_window == 1


def test_reference_must_be_a_runner_and_candidates_needed() -> None:
    machine = Machine(seed=0)
    with pytest.raises(ValueError):
        measure_speed({"int8": machine.runner("int8", 1.0)}, "fp32", batch_size=1, settings=_settings(), threads=1)
    with pytest.raises(ValueError):
        measure_speed({"fp32": machine.runner("fp32", 1.0)}, "fp32", batch_size=1, settings=_settings(), threads=1)


def _cpu_work(ms: float) -> Callable[[], None]:
    """Burn `ms` of this thread's CPU time: wall time grows when the machine is busy, CPU cost does not,
    so the true ratio of two such runners is exactly the ratio of their costs."""
    def run() -> None:
        end = time.thread_time() + ms / 1000.0
        while time.thread_time() < end:
            pass
    return run


def test_real_cpu_work_of_known_ratio() -> None:
    """Real runs, timed as measure_against_fp32 times one-thread runs (CPU clock, wall-clock budget)."""
    runners = {"fp32": _cpu_work(2.0), "half": _cpu_work(1.0), "same": _cpu_work(2.0)}
    settings = _settings(max_seconds=8.0, confidence=0.99)
    _name, clock = run_clock(1)
    started = time.perf_counter()
    result = measure_speed(runners, "fp32", batch_size=1, settings=settings, threads=1, clock=clock,
                           wall_clock=time.perf_counter)
    elapsed = time.perf_counter() - started
    half, same = result["half"], result["same"]
    # 1% slack on top of the 99% interval: timer overshoot of the busy loops, not the estimator.
    assert half.low * 0.99 <= 2.0 <= half.high * 1.01, half.describe()
    assert same.low * 0.99 <= 1.0 <= same.high * 1.01, same.describe()
    assert elapsed < 8.0 + 3.0  # the budget, plus at worst one round and the final bootstrap
    line = summary(result)
    assert line.startswith(f"half {half.speedup:.2f}× [") and f"fp32 {half.fp32_p50_ms:.3f} ms" in line


# --- load states that outlast rounds --------------------------------------------------------------
def _regime_rounds(seed: int, rounds: int,
                   mean_state_ms: float = 1000.0) -> tuple[list[list[float]], list[list[float]]]:
    """Like a shared machine whose sibling core is busy for a second at a time: while busy, fp32 runs
    2.2× and int8 2.6× slower (the ratio itself depends on the state), 5 runs per window."""
    rng = random.Random(seed)
    busy = rng.random() < 0.5
    fp32: list[list[float]] = []
    cand: list[list[float]] = []
    for index in range(rounds):
        order = [(fp32, 6.2, 2.2), (cand, 2.6, 2.6)]
        for target, base, factor in order if index % 2 == 0 else order[::-1]:
            window = []
            for _ in range(5):
                took = base * (factor if busy else 1.0) * math.exp(rng.gauss(0.0, 0.08))
                window.append(took)
                if rng.random() < 1.0 - math.exp(-took / mean_state_ms):
                    busy = not busy
            target.append(window)
    return fp32, cand


def test_block_length_is_one_for_independent_rounds_and_grows_with_persistence() -> None:
    rng = random.Random(0)
    independent = [block_length([rng.gauss(0.0, 1.0) for _ in range(100)]) for _ in range(100)]
    assert sum(length == 1 for length in independent) >= 95
    persistent = []
    for seed in range(10):
        fp32, cand = _regime_rounds(seed=seed, rounds=120)
        persistent.append(block_length([math.log(median(f) / median(c)) for f, c in zip(fp32, cand, strict=True)]))
    assert sum(length >= 3 for length in persistent) >= 8, persistent


def test_persistent_load_states_widen_the_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resampling single rounds would treat 120 rounds in a handful of load states as 120 independent
    readings; the block bootstrap sees the few states and widens the interval accordingly (in
    simulation: coverage of the long-run ratio 97% instead of 87%)."""
    from qtune.tuning import speed

    widths_block, widths_single = [], []
    for seed in range(6):
        fp32, cand = _regime_rounds(seed=seed, rounds=120)
        point, low, high = speedup_interval(fp32, cand, resamples=300)
        widths_block.append((high - low) / point)
        with monkeypatch.context() as patch:
            patch.setattr(speed, "block_length", lambda series: 1)
            point, low, high = speedup_interval(fp32, cand, resamples=300)
        widths_single.append((high - low) / point)
    assert median(widths_block) > 1.5 * median(widths_single)


def test_cpu_clock_for_one_thread_wall_clock_otherwise() -> None:
    assert run_clock(1) == ("cpu", time.thread_time)
    assert run_clock(2) == ("wall", time.perf_counter)


def test_budget_is_wall_time_when_runs_are_timed_by_cpu_time() -> None:
    """On a busy machine a run's wall time is a multiple of its CPU time: the budget must not stretch."""
    machine = Machine(seed=8, burst_every_ms=0.0, jitter=0.3)
    cpu = {"now": 0.0}

    def runner(cost_ms: float) -> Callable[[], None]:
        def run() -> None:
            cpu["now"] += cost_ms / 1000.0
            machine.run_for(3.0 * cost_ms)  # wall: the CPU is shared with two other processes
        return run

    result = measure_speed({"fp32": runner(2.0), "int8": runner(1.9)}, "fp32", batch_size=1,
                           settings=_settings(max_seconds=3.0, target_precision=0.001), threads=1,
                           clock=lambda: cpu["now"], wall_clock=machine.clock)["int8"]
    assert result.seconds <= 3.0 * 1.05
    assert result.speedup == pytest.approx(2.0 / 1.9)  # CPU time has no noise here
    assert result.p50_ms == pytest.approx(1.9)
