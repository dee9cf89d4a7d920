"""Was this process short of CPU during a measurement window? Signals the kernel keeps, and a verdict.

A speed figure timed by the wall clock is only as good as the CPUs it ran on. With several
intra-op threads, an op waits for its slowest thread: when another process holds one of the
cores, a thread of ours waits in the run queue and the whole op stretches, by an amount that
depends on the model (measured: one CNN's fp32 doubled while its int8 did not move, 1.5× → 7×;
another went 2.3× → 1.7×). Interleaving fp32 and int8 does not cancel that. So every window is
checked, and a contended one does not count.

Signals, read before and after a window (each where the kernel provides it):
- run delay: the time this process's threads were runnable but waiting for a CPU
  (`/proc/self/task/*/schedstat`, 2nd field). The direct measure of what biases a wall-clock
  window; it sees only our threads, so load on CPUs we do not use does not count.
- CPU pressure: PSI `some` total of our cgroup (`cpu.pressure`, cgroup v2) or of the machine
  (`/proc/pressure/cpu`): the share of time some task waited for a CPU. Used when run delay is
  not available.
- involuntary context switches of the process (`getrusage(RUSAGE_SELF).ru_nivcsw`): the last
  resort when neither of the above is.
- cgroup CPU throttling (`cpu.stat` nr_throttled, v2 `throttled_usec`, v1 `throttled_time`): a pod
  that used up its CFS quota was stopped for the rest of the period.
- steal time (`/proc/stat`): a virtual machine's vCPU waited for the hypervisor.

`contention(load)` is the pure decision; `CpuProbe` reads the files; `cpu_placement` tells whether
the process has CPUs of its own (a pod under the kubelet's static CPU manager policy).
"""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

RUN_DELAY_LIMIT = 0.10
"""A window is contended when our threads waited for a CPU longer than this share of
(window × threads). Measured with 2 threads on a 2-core machine (docs/speed.md): one CPU hog beside
them, 30–50% in every window, and the 2-thread speedup of a CNN read 1.68× for a true 0.95×; other
work nearly kept off (it at a far lower priority), a median of 5% and a tenth of windows above 10%,
with the speedup within 5% of the truth."""
PRESSURE_LIMIT = 0.10
"""... or, without run delay, when some task of our cgroup (or machine) waited this share of the window."""
SWITCH_RATE_LIMIT = 50.0
"""... or, with neither, more than this many involuntary context switches per second and thread."""
STEAL_LIMIT = 0.02
"""Steal time above this share of the window × CPUs: the hypervisor ran someone else on our vCPUs."""
BUSY_SHARE = 0.5
"""A measurement in which at least this share of the rounds was contended says the machine stayed busy."""


@dataclass(frozen=True)
class CpuSample:
    """The counters at one moment; None where this kernel or container does not provide one."""

    wall: float
    """time.perf_counter() seconds"""
    run_delay_ns: int | None
    involuntary_switches: int
    pressure_us: int | None
    throttled_periods: int | None
    steal_ticks: int | None


@dataclass(frozen=True)
class WindowLoad:
    """What happened to the CPUs between two samples, relative to the window (pure data)."""

    seconds: float
    threads: int
    run_delay_share: float | None = None
    """run-queue wait of our threads / (seconds × threads)"""
    pressure_share: float | None = None
    switch_rate: float = 0.0
    """involuntary context switches per second and thread"""
    throttled_periods: int = 0
    steal_share: float | None = None


def contention(load: WindowLoad) -> str | None:
    """Why the window was contended (a short phrase), or None when it was not.

    Throttling and steal always count. Of the three views of waiting for a CPU, the most direct
    available one decides: run delay (ours alone), else CPU pressure, else context switches."""
    if load.seconds <= 0.0:
        return None
    if load.throttled_periods > 0:
        return f"CPU quota throttled {load.throttled_periods} time(s)"
    if load.steal_share is not None and load.steal_share > STEAL_LIMIT:
        return f"hypervisor steal {load.steal_share:.0%}"
    if load.run_delay_share is not None:
        if load.run_delay_share > RUN_DELAY_LIMIT:
            return f"threads waited for a CPU {load.run_delay_share:.0%} of the time"
        return None
    if load.pressure_share is not None:
        if load.pressure_share > PRESSURE_LIMIT:
            return f"CPU pressure {load.pressure_share:.0%}"
        return None
    if load.switch_rate > SWITCH_RATE_LIMIT:
        return f"{load.switch_rate:.0f} involuntary context switches/s per thread"
    return None


def load_between(before: CpuSample, after: CpuSample, threads: int, cpus: int | None = None) -> WindowLoad:
    """The load of the window from `before` to `after` for a measurement using `threads` threads
    (`cpus`: CPUs the steal ticks are summed over; default the machine's)."""
    seconds = max(after.wall - before.wall, 0.0)
    threads = max(int(threads), 1)
    if seconds <= 0.0:
        return WindowLoad(seconds=0.0, threads=threads)

    def delta(a: int | None, b: int | None) -> int | None:
        return None if a is None or b is None else max(b - a, 0)

    delay = delta(before.run_delay_ns, after.run_delay_ns)
    pressure = delta(before.pressure_us, after.pressure_us)
    throttled = delta(before.throttled_periods, after.throttled_periods)
    steal = delta(before.steal_ticks, after.steal_ticks)
    ticks_per_second = _clock_ticks()
    steal_cpus = max(cpus or os.cpu_count() or 1, 1)
    return WindowLoad(
        seconds=seconds, threads=threads,
        run_delay_share=None if delay is None else delay / 1e9 / (seconds * threads),
        pressure_share=None if pressure is None else pressure / 1e6 / seconds,
        switch_rate=max(after.involuntary_switches - before.involuntary_switches, 0) / seconds / threads,
        throttled_periods=throttled or 0,
        steal_share=None if steal is None else steal / ticks_per_second / (seconds * steal_cpus),
    )


def _clock_ticks() -> float:
    try:
        return float(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 100.0


class CpuProbe:
    """Reads the counters of `CpuSample`; finds once which of the files this machine has.

    `proc` and `cgroup` are the roots (tests point them at fixtures)."""

    def __init__(self, proc: Path = Path("/proc"), cgroup: Path = Path("/sys/fs/cgroup")) -> None:
        self.proc = proc
        self.tasks = proc / "self" / "task"
        self.pressure_file = _first_readable([cgroup / "cpu.pressure", proc / "pressure" / "cpu"])
        self.cpu_stat = _first_readable([cgroup / "cpu.stat", cgroup / "cpu" / "cpu.stat",
                                         cgroup / "cpu,cpuacct" / "cpu.stat"])
        self.has_run_delay = self._run_delay() is not None
        self.has_steal = self._steal() is not None

    def sample(self) -> CpuSample:
        return CpuSample(
            wall=time.perf_counter(),
            run_delay_ns=self._run_delay() if self.has_run_delay else None,
            involuntary_switches=resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw,
            pressure_us=_pressure_some_us(self.pressure_file) if self.pressure_file else None,
            throttled_periods=_throttled_periods(self.cpu_stat) if self.cpu_stat else None,
            steal_ticks=self._steal() if self.has_steal else None,
        )

    def signals(self) -> list[str]:
        """Which signals this machine provides (for the log)."""
        names = ["run delay"] if self.has_run_delay else []
        names += [f"CPU pressure ({self.pressure_file})"] if self.pressure_file else []
        names += ["involuntary context switches"]
        names += [f"throttling ({self.cpu_stat})"] if self.cpu_stat else []
        names += ["steal"] if self.has_steal else []
        return names

    def _run_delay(self) -> int | None:
        """Sum over this process's threads of their run-queue wait (ns); None without schedstat."""
        total, seen = 0, False
        try:
            entries = os.listdir(self.tasks)
        except OSError:
            return None
        for tid in entries:
            try:
                fields = (self.tasks / tid / "schedstat").read_text().split()
            except OSError:  # the thread ended in between
                continue
            if len(fields) >= 2:
                total += int(fields[1])
                seen = True
        return total if seen else None

    def _steal(self) -> int | None:
        try:
            with open(self.proc / "stat") as handle:
                fields = handle.readline().split()
        except OSError:
            return None
        return int(fields[8]) if len(fields) > 8 and fields[0] == "cpu" else None


def _first_readable(paths: list[Path]) -> Path | None:
    for path in paths:
        try:
            path.read_text()
        except OSError:
            continue
        return path
    return None


def _pressure_some_us(path: Path) -> int | None:
    """`total=` of the `some` line of a PSI file (µs)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("some "):
                return int(line.rsplit("total=", 1)[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _throttled_periods(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "nr_throttled":
                return int(value)
    except (OSError, ValueError):
        return None
    return None


# --- whose CPUs -----------------------------------------------------------------------------------
def parse_cpu_list(text: str) -> set[int]:
    """`0-3,8,10-11` -> {0, 1, 2, 3, 8, 10, 11} (the kernel's cpulist format)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def exclusive_cpus(cpuset: set[int] | None, affinity: set[int], online: set[int], owned: int) -> bool | None:
    """Whether the process runs on CPUs of its own: its cgroup's cpuset is exactly `owned` CPUs
    (the pod's integer CPU request), fewer than the node has, and the thread affinity is that set.

    That is what the kubelet's static CPU manager policy gives a Guaranteed pod with an integer CPU
    request; without it the cpuset is the node's shared pool. None when the cpuset is unknown."""
    if cpuset is None or not cpuset:
        return None
    return len(cpuset) == owned and cpuset < online and affinity == cpuset


def cpu_placement(owned: int, cgroup: Path = Path("/sys/fs/cgroup"),
                  devices: Path = Path("/sys/devices/system/cpu")) -> bool | None:
    """`exclusive_cpus` for this process, read from cgroup v2 (`cpuset.cpus.effective`) or v1
    (`cpuset/cpuset.effective_cpus`); None when neither can be read."""
    cpuset = None
    for path in (cgroup / "cpuset.cpus.effective", cgroup / "cpuset" / "cpuset.effective_cpus"):
        try:
            cpuset = parse_cpu_list(path.read_text())
            break
        except (OSError, ValueError):
            continue
    try:
        online = parse_cpu_list((devices / "online").read_text())
    except (OSError, ValueError):
        online = set(range(os.cpu_count() or 1))
    try:
        affinity = set(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = set(online)
    return exclusive_cpus(cpuset, affinity, online, owned)
