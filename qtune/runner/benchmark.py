"""Speed against fp32, measured so that its uncertainty is known.

fp32 and the candidates run in one process, in short windows (about 75 ms each) that alternate
round after round, in an order rotated every round (A B C, B C A, C A B, ...) so no model always
runs first or right after another. Rounds are added until every candidate's speedup interval
(`qtune.tuning.speed.speedup_interval`, a paired bootstrap over rounds) is narrow enough, or the
time budget is spent: on a busy machine the answer is a wider interval, not a different speedup.

Which clock: with one thread the inference runs entirely on the calling thread, and its CPU time
(`time.thread_time`) is what the run costs on a CPU of its own. Wall time on a shared CPU adds
the time the scheduler gave to other processes, in slices of a few ms, which does not scale with
the model: measured on a busy 2-core machine, per-round wall-time ratios of one int8/fp32 pair
ranged 1.3–4.1× and whole measurements 2.1–2.5× apart, CPU-time ratios 2.2–2.5× per round. With
several threads, CPU time would add up the threads (and their spinning), so wall time is used.

Contention: wall time with several threads is biased by a busy machine in a way interleaving does
not cancel (an op waits for its slowest thread; measured: 1.5× → 7× on one CNN, 2.3× → 1.7× on
another, with one CPU hog on a 2-core machine). So each window is checked
(`qtune.runner.contention`): a round in which our threads waited for a CPU is left out of a
wall-clock figure and another round runs instead. When the machine stays busy (half the rounds or
more contended, or too few clean ones in the budget), `measure_against_fp32` measures again with
one thread timed by CPU time, which the contention does not bias, and the figure says so
(`requested_threads`, `busy`); a figure that could not be measured either way is marked
`trusted=False` and nothing is decided on it.

Load the counters cannot see (a virtual machine's vCPUs held back by its host): the fp32 runs are the
canary, `qtune.runner.canaries`.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qtune.protocol import SpeedMeasurement
from qtune.runner.canaries import ONE_THREAD_EVERY, one_thread_affordable, with_slow_rounds
from qtune.runner.contention import BUSY_SHARE, CpuProbe, CpuSample, contention, cpu_placement, load_between
from qtune.runner.quiet_reference import job_quiet_fp32_ms, remember_quiet
from qtune.spec.models import BenchmarkSpec
from qtune.tuning.speed import median, percentile, speedup_interval

if TYPE_CHECKING:
    from qtune.runner.context import JobContext

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 0.075
"""Target length of one window: long enough to hold many runs of a small model, short enough that
a load burst usually spans both windows of a round (which then cancel in the ratio)."""
MAX_RUNS_PER_WINDOW = 1000
WARMUP_SHARE = 0.2
"""At most this share of `max_seconds` goes to warm-up (after one run of each model)."""
CHECK_RESAMPLES = 500
"""Bootstrap resamples of the stopping check after a round (the final interval uses 2000)."""
REFERENCE = "fp32"

Clock = Callable[[], float]
Probe = Callable[[], CpuSample]
"""Reads the CPU counters (`CpuProbe.sample`); tests pass a synthetic one."""


@dataclass
class _Rounds:
    """One interleaved measurement: what it runs, how, and the windows and verdicts of its rounds so far."""

    runners: Mapping[str, Callable[[], None]]
    names: list[str]  # the reference (fp32) first
    settings: BenchmarkSpec
    threads: int
    clock: Clock
    wall: Clock
    probe: Probe | None
    drop_contended: bool
    fp32_quiet_ms: float | None
    runs_per_window: int
    one_thread: Callable[[], None] | None = None  # the reference with one thread (module docstring)
    one_thread_runs: int = 1
    one_thread_clock: Clock = time.thread_time
    one_thread_ms: list[float] = field(default_factory=list)  # its windows' medians, thread CPU time
    windows: dict[str, list[list[float]]] = field(default_factory=dict)
    # per round: why the counters say it was contended, or None
    measured: list[str | None] = field(default_factory=list)
    # the same, or why its fp32 window says so (`_with_slow_rounds`)
    contended: list[str | None] = field(default_factory=list)
    fp32_ms: list[float] = field(default_factory=list)  # per round: the fp32 window's median
    rounds: int = 0
    stayed_busy: bool = False

    def __post_init__(self) -> None:
        self.windows = {name: [] for name in self.names}

    @property
    def reference(self) -> str:
        return self.names[0]

    def play(self) -> None:
        """One round: a window of each model, in an order rotated every round, each checked for contention."""
        shift = self.rounds % len(self.names)
        reasons = []
        for name in self.names[shift:] + self.names[:shift]:
            before = self.probe() if self.probe else None
            self.windows[name].append(_window(self.runners[name], self.runs_per_window, self.clock))
            if self.probe and before is not None:
                reasons.append(contention(load_between(before, self.probe(), self.threads)))
        if self.one_thread is not None and self.rounds % ONE_THREAD_EVERY == 0:
            self.one_thread_ms.append(median(_window(self.one_thread, self.one_thread_runs, self.one_thread_clock)))
        self.measured.append(next((r for r in reasons if r), None))
        self.fp32_ms.append(median(self.windows[self.reference][-1]))
        if self.probe and self.drop_contended:  # each round again: a faster fp32 window later shows earlier ones slow
            one_thread = median(self.one_thread_ms) if self.one_thread_ms else None
            self.contended = with_slow_rounds(self.measured, self.fp32_ms, self.fp32_quiet_ms, one_thread,
                                               self.threads)
        else:
            self.contended = list(self.measured)
        self.rounds += 1


def measure_speed(runners: Mapping[str, Callable[[], None]], reference: str, *, batch_size: int,
                  settings: BenchmarkSpec, threads: int, clock: Clock = time.perf_counter,
                  wall_clock: Clock | None = None, probe: Probe | None = None,
                  drop_contended: bool = True, fp32_quiet_ms: float | None = None,
                  one_thread_reference: Callable[[], None] | None = None,
                  one_thread_clock: Clock = time.thread_time) -> dict[str, SpeedMeasurement]:
    """Each candidate's speed against `runners[reference]` (fp32), from interleaved rounds.

    Every runner executes one inference per call. Warm-up: `settings.warmup_runs` calls of each
    (at least one: the window is sized from them). Then rounds of one window per model, at least
    `settings.min_rounds`; after that, stop once every candidate's interval half-width is below
    `target_precision` × its speedup and every model has `settings.runs` timed runs, or before a
    round would overrun `settings.max_seconds`. Returns {candidate name: SpeedMeasurement}; the
    fp32 figures in each come from the same windows as the candidate's. `clock` times the runs;
    the budget and `seconds` are counted on `wall_clock` (default: `clock`), so a CPU-time `clock`
    cannot stretch the budget on a busy machine.

    With a `probe`, every window is checked for contention. `drop_contended` (for a clock that
    contention biases: wall time) leaves contended rounds out of the figure and of the round counts
    above; the measurement then ends early when the machine stays busy, and its figures are marked
    `busy` and not `trusted`. Without `drop_contended` (CPU time) contended rounds are counted and
    kept, and a busy machine is only reported. A round whose fp32 window ran `SLOW_FACTOR` times slower than
    its quiet time (`fp32_quiet_ms`, milliseconds on `clock`, or the fastest fp32 window so far) is contended
    too, for a wall clock with a `probe` (module docstring: load the counters cannot see; one thread's CPU
    time stretches alike for both models). So is a round whose reference window ran `ONE_THREAD_MARGIN` times
    slower than `one_thread_reference` (the reference model with one thread, timed by `one_thread_clock`: CPU
    time) when `threads` > 1: the scaling canary of the module docstring."""
    if reference not in runners:
        raise ValueError(f"reference {reference!r} is not among the runners {sorted(runners)}")
    names = [reference] + [name for name in runners if name != reference]
    if len(names) < 2:
        raise ValueError("measure_speed needs at least one candidate besides the reference")
    wall = wall_clock or clock
    started = wall()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed run is noise that belongs to neither model
    try:
        warm_budget = settings.max_seconds * WARMUP_SHARE / len(names)
        cost = {name: _warm_up(runners[name], settings.warmup_runs, warm_budget, clock, wall) for name in names}
        runs_per_window = max(1, min(MAX_RUNS_PER_WINDOW, round(WINDOW_SECONDS / max(max(cost.values()), 1e-9))))
        state = _Rounds(runners, names, settings, threads, clock, wall, probe, drop_contended, fp32_quiet_ms,
                        runs_per_window)
        if one_thread_reference is not None and threads > 1 and probe is not None and drop_contended:
            one_cost = _warm_up(one_thread_reference, 2, warm_budget, one_thread_clock, wall)
            state.one_thread, state.one_thread_clock = one_thread_reference, one_thread_clock
            state.one_thread_runs = max(1, min(MAX_RUNS_PER_WINDOW, round(WINDOW_SECONDS / max(one_cost, 1e-9))))
        _play_until_done(state, started, batch_size)
    finally:
        if gc_was_enabled:
            gc.enable()
    return _measured(state, batch_size, seconds=wall() - started)


def _play_until_done(state: _Rounds, started: float, batch_size: int) -> None:
    """Play rounds until the figures are precise enough, the budget is spent or the machine stays busy."""
    settings = state.settings
    next_check = settings.min_rounds
    while True:
        round_started = state.wall()
        state.play()
        rounds = state.rounds
        now = state.wall()
        kept = rounds - sum(1 for r in state.contended if r) if state.drop_contended else rounds
        if state.drop_contended and _stays_busy(state.contended, settings.min_rounds):
            state.stayed_busy = True
            logger.info("speed at batch %d: the machine stays busy (%d of %d rounds contended, e.g. %s)",
                        batch_size, rounds - kept, rounds, next(r for r in state.contended if r))
            return
        over_budget = now - started + (now - round_started) > settings.max_seconds
        if rounds < settings.min_rounds or (kept < settings.min_rounds and not over_budget):
            continue
        if over_budget:
            logger.debug("speed at batch %d: time budget spent after %d rounds", batch_size, rounds)
            state.stayed_busy = state.drop_contended and kept < settings.min_rounds
            return
        if kept * state.runs_per_window < settings.runs or kept < next_check:
            continue
        used = _kept_rounds(state.windows, state.contended, state.drop_contended)
        if all(_precise(used[state.reference], used[name], settings) for name in state.names[1:]):
            return
        next_check = kept + max(1, kept // 10)  # the check's cost grows with the rounds


def _measured(state: _Rounds, batch_size: int, seconds: float) -> dict[str, SpeedMeasurement]:
    """The figures of a finished measurement, with how contended it was and whether it can be trusted."""
    used = state.windows if state.stayed_busy else _kept_rounds(state.windows, state.contended, state.drop_contended)
    busy_rounds = sum(1 for r in state.contended if r)
    results = _results(used, state.reference, state.names[1:], batch_size, state.settings, state.threads,
                       state.runs_per_window, seconds=seconds)
    for measurement in results.values():
        measurement.contended_rounds = busy_rounds
        measurement.busy = state.stayed_busy or busy_rounds >= BUSY_SHARE * state.rounds > 0
        measurement.trusted = not state.stayed_busy
    return results


def _stays_busy(contended: list[str | None], min_rounds: int) -> bool:
    """At least twice `min_rounds` rounds, and at least `BUSY_SHARE` of all, were contended (a burst
    shorter than that is waited out)."""
    count = sum(1 for reason in contended if reason)
    return count >= 2 * min_rounds and count >= BUSY_SHARE * len(contended)


def _kept_rounds(windows: dict[str, list[list[float]]], contended: list[str | None],
                 drop_contended: bool) -> dict[str, list[list[float]]]:
    if not drop_contended or not any(contended):
        return windows
    return {name: [w for w, reason in zip(rounds, contended, strict=True) if not reason]
            for name, rounds in windows.items()}


def _warm_up(run: Callable[[], None], count: int, budget: float, clock: Clock, wall: Clock) -> float:
    """Run `count` untimed calls (at least one; fewer if they exceed `budget` wall seconds) and
    return one run's typical duration on `clock` (median of the later half: the first calls are slow)."""
    times: list[float] = []
    started = wall()
    for _ in range(max(count, 1)):
        begin = clock()
        run()
        times.append(clock() - begin)
        if wall() - started > budget:
            break
    return median(times[len(times) // 2:])


def _window(run: Callable[[], None], count: int, clock: Clock) -> list[float]:
    """`count` timed calls; milliseconds each."""
    times: list[float] = []
    for _ in range(count):
        begin = clock()
        run()
        times.append((clock() - begin) * 1000.0)
    return times


def _precise(fp32: list[list[float]], candidate: list[list[float]], settings: BenchmarkSpec) -> bool:
    speedup, low, high = speedup_interval(fp32, candidate, settings.confidence, resamples=CHECK_RESAMPLES)
    return (high - low) / 2.0 < settings.target_precision * speedup


def _results(windows: dict[str, list[list[float]]], reference: str, candidates: list[str], batch_size: int,
             settings: BenchmarkSpec, threads: int, runs_per_window: int, seconds: float,
             ) -> dict[str, SpeedMeasurement]:
    fp32_rounds = windows[reference]
    fp32_all = [t for window in fp32_rounds for t in window]
    fp32_p50, fp32_p90 = median(fp32_all), percentile(fp32_all, 90.0)
    results: dict[str, SpeedMeasurement] = {}
    for name in candidates:
        own = [t for window in windows[name] for t in window]
        p50 = median(own)
        if p50 <= 0.0 or fp32_p50 <= 0.0:
            raise ValueError(f"the clock did not advance during the runs of {name!r} or {reference!r}: "
                             "too coarse to time them")
        _point, low, high = speedup_interval(fp32_rounds, windows[name], settings.confidence)
        speedup = fp32_p50 / p50  # the printed latencies divide exactly to the speedup
        results[name] = SpeedMeasurement(
            batch_size=batch_size, p50_ms=p50, p90_ms=percentile(own, 90.0), fp32_p50_ms=fp32_p50,
            fp32_p90_ms=fp32_p90, speedup=speedup, low=min(low, speedup), high=max(high, speedup),
            confidence=settings.confidence, rounds=len(fp32_rounds), runs_per_window=runs_per_window,
            threads=threads, seconds=round(seconds, 3),
        )
    return results


def run_clock(threads: int) -> tuple[str, Clock]:
    """The clock that times one inference run with `threads` threads, and its name (see above)."""
    if threads == 1:
        return "cpu", time.thread_time
    return "wall", time.perf_counter


Make = Callable[[object, int], Callable[[], None]]
"""(model, threads) -> a runner of one inference per call: how one workload runs a model."""


def workloads(context: JobContext) -> list[tuple[str, int, Make]]:
    """What a speed measurement measures, as (key of the figure, batch size, make): every benchmark batch size
    (key: the size), then a language model's prefill and decode (`qtune.runner.decode_speed`) when
    `spec.benchmark.decode` is set (batch sizes then only with its `withBatchSizes`)."""
    adaptor = context.adaptor
    found: list[tuple[str, int, Make]] = []
    for size, batch in context.benchmark_batches().items():
        def make(model: object, threads: int, batch: dict[str, object] = batch) -> Callable[[], None]:
            return adaptor.make_runner(model, batch, threads)

        found.append((str(size), size, make))
    if context.spec.benchmark.decode is not None:
        from qtune.runner.decode_speed import decode_workloads

        found += decode_workloads(context)
    return found


def measure_against_fp32(context: JobContext, models: Mapping[str, object],
                         clock: Clock | None = None) -> dict[str, dict[str, SpeedMeasurement]]:
    """Speed of each model in `models` against the job's fp32 model, for every workload (`workloads`: each
    benchmark batch size; a language model's prefill and decode).

    One interleaved session per workload holds fp32 and ALL the models (a trial passes one, the
    final confirmation several), with the job's benchmark settings and thread count; `clock`
    defaults to `run_clock(threads)`. Every window is checked for contention (module docstring);
    when the machine stays busy during a wall-clock session, the workload is measured again with
    one thread by CPU time. Returns {name: {workload key (a batch size as str, prefill, decode): SpeedMeasurement}}."""
    if not models:
        return {}
    settings = context.spec.benchmark
    threads = context.benchmark_threads
    clock_name, default_clock = run_clock(threads)
    if clock is None:
        clock = default_clock
    else:
        clock_name = getattr(clock, "__name__", "custom")
    probe = default_probe()
    exclusive = cpu_placement(context.threads) if in_pod() else None
    quiet = job_quiet_fp32_ms(context, threads) if clock_name == "wall" and not in_pod() else {}
    reference = REFERENCE
    while reference in models:
        reference = f"_{reference}"
    results: dict[str, dict[str, SpeedMeasurement]] = {name: {} for name in models}
    # OnnxModel.size parses the graph for external data: asked once, not per batch size
    check_one_thread = clock_name == "wall" and threads > 1 and one_thread_affordable(context.model)
    for key, size, make in workloads(context):
        runners = {reference: make(context.model, threads)}
        runners.update({name: make(model, threads) for name, model in models.items()})
        one_thread = make(context.model, 1) if check_one_thread else None
        measured = measure_speed(runners, reference, batch_size=size, settings=settings, threads=threads,
                                 clock=clock, wall_clock=time.perf_counter, probe=probe,
                                 drop_contended=clock_name != "cpu", fp32_quiet_ms=quiet.get(key),
                                 one_thread_reference=one_thread)
        del one_thread, runners
        for measurement in measured.values():
            measurement.cpu_clock = clock_name == "cpu"
        used_clock = clock_name  # per workload: a fallback at one leaves the next one's clock alone
        if threads > 1 and not all(m.trusted for m in measured.values()):
            first = next(iter(measured.values()))
            logger.warning("speed of %s: the machine stayed busy while measuring with %d threads (%d rounds "
                           "contended): measuring again with 1 thread, timed by its CPU time", key, threads,
                           first.contended_rounds)
            measured = _measure_one_thread(context, models, reference, make, size, probe, threads,
                                           first.contended_rounds)
            used_clock = "cpu"
        for name, measurement in measured.items():
            measurement.exclusive_cpus = exclusive
            results[name][key] = measurement
        if used_clock == "wall" and not in_pod():
            remember_quiet(context, threads, key, measured.values())
        logger.info("speed of %s, %d thread(s), %s time: %s", _workload_text(key),
                    next(iter(measured.values())).threads, used_clock, summary(measured))
    return results


def _workload_text(key: str) -> str:
    return f"batch {key}" if key.isdigit() else key


def _measure_one_thread(context: JobContext, models: Mapping[str, object], reference: str, make: Make,
                        size: int, probe: Probe | None, requested: int,
                        contended_before: int) -> dict[str, SpeedMeasurement]:
    """The fallback on a busy machine: one thread, each run timed by the thread's CPU time, which the
    load of other processes does not bias (module docstring). Marked busy, with the thread count asked for."""
    runners = {reference: make(context.model, 1)}
    runners.update({name: make(model, 1) for name, model in models.items()})
    measured = measure_speed(runners, reference, batch_size=size, settings=context.spec.benchmark, threads=1,
                             clock=time.thread_time, wall_clock=time.perf_counter, probe=probe,
                             drop_contended=False)
    for measurement in measured.values():
        measurement.cpu_clock = True
        measurement.busy = True
        measurement.requested_threads = requested
        measurement.contended_rounds += contended_before
    return measured


_PROBE: CpuProbe | None = None


def default_probe() -> Probe:
    """This machine's `CpuProbe.sample` (the files are looked up once per process)."""
    global _PROBE
    if _PROBE is None:
        _PROBE = CpuProbe()
        logger.debug("contention signals: %s", ", ".join(_PROBE.signals()))
    return _PROBE.sample


def in_pod() -> bool:
    """Running as a trial pod (the operator sets QTUNE_POD_NAME; a local run does not)."""
    return bool(os.environ.get("QTUNE_POD_NAME"))


def summary(measured: Mapping[str, SpeedMeasurement]) -> str:
    """One line: each candidate's speedup and interval, then the shared fp32 figure and effort."""
    if not measured:
        return "nothing measured"
    first = next(iter(measured.values()))
    parts = [f"{name} {m.speedup:.2f}× [{m.low:.2f}–{m.high:.2f}] ({m.p50_ms:.3f} ms)" for name, m in measured.items()]
    return (f"{'; '.join(parts)}; fp32 {first.fp32_p50_ms:.3f} ms; {first.rounds} rounds × "
            f"{first.runs_per_window} runs in {first.seconds:.1f} s")
