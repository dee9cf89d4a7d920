"""Local executor: each unit of work is a `python -m qtune.runner ...` child process.

A child per unit isolates crashes (a segfault in a framework fails one trial, not the run),
enforces the per-unit wall-clock limit (the process group is killed), and pins each running
unit to its own CPUs so that parallel trials do not disturb each other's latency. The child
dies with this process (PR_SET_PDEATHSIG), so no trial outlives a killed `qtune tune`.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtune.protocol import (
    EXIT_JOB_UNUSABLE,
    INVALID_SPEC,
    BaselineResult,
    ConfirmResult,
    TrialResult,
    UnitKind,
    parse_termination,
    unit_timeout_seconds,
)
from qtune.tuning import codec
from qtune.tuning.engine import UnitFailure, UnitOutcome
from qtune.tuning.history import write_json_atomic
from qtune.tuning.session import WorkUnit
from qtune.tuning.space import TuningSpace

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
TERMINATION_FILE = "termination"
_PR_SET_PDEATHSIG = 1


def available_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return list(range(os.cpu_count() or 1))


def cpu_slots(parallel: int) -> list[list[int]]:
    """Split this machine's CPUs into `parallel` disjoint sets (shared when there are too few)."""
    cpus = available_cpus()
    if parallel >= len(cpus):
        return [[cpus[i % len(cpus)]] for i in range(parallel)]
    size = len(cpus) // parallel
    return [cpus[i * size:(i + 1) * size] for i in range(parallel)]


def unit_dir(workspace: Path, unit: WorkUnit | str) -> Path:
    unit_id = unit if isinstance(unit, str) else unit.id
    if unit_id in (UnitKind.BASELINE, UnitKind.CONFIRM):
        return workspace / unit_id
    return workspace / "trials" / unit_id.split("-", 1)[1]


@dataclass
class RunningUnit:
    unit: WorkUnit
    process: subprocess.Popen[bytes]
    slot: int
    started: float
    folder: Path
    timeout: float
    log_file: Any = field(repr=False, default=None)


@dataclass
class LocalExecutor:
    job_file: Path
    base_dir: Path
    workspace: Path
    parallel: int
    trial_timeout: float
    threads: int | None = None
    units: dict[str, RunningUnit] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.slots = cpu_slots(self.parallel)
        self.capacity = self.parallel

    def running(self) -> set[str]:
        return set(self.units)

    def _slot(self) -> int:
        used = {u.slot for u in self.units.values()}
        return next(i for i in range(self.parallel) if i not in used)

    def threads_for(self, slot: int = 0) -> int:
        return self.threads or len(self.slots[slot])

    def command(self, unit: WorkUnit, folder: Path, threads: int) -> list[str]:
        # -P: the current folder never shadows an installed module (a `yaml.py` beside the user's shell)
        command = [sys.executable, "-P", "-m", "qtune.runner", unit.kind, "--job", str(self.job_file),
                   "--base-dir", str(self.base_dir), "--workspace", str(self.workspace),
                   "--threads", str(threads), "--result", str(folder / RESULT_FILE)]
        if unit.kind == UnitKind.TRIAL:
            config_file = folder / "config.json"
            write_json_atomic(config_file, codec.dump(unit.tune_config))
            command += ["--index", str(unit.trial), "--config", str(config_file)]
            if unit.full_evaluation:
                command.append("--full-evaluation")
        elif unit.kind == UnitKind.CONFIRM:
            configs_file = folder / "candidates.json"
            write_json_atomic(configs_file, {k: codec.dump(v) for k, v in unit.candidate_configs.items()})
            command += ["--candidates", ",".join(map(str, unit.candidates)), "--config", str(configs_file)]
        return command

    def start(self, unit: WorkUnit) -> None:
        folder = unit_dir(self.workspace, unit)
        folder.mkdir(parents=True, exist_ok=True)
        for name in (RESULT_FILE, TERMINATION_FILE):
            (folder / name).unlink(missing_ok=True)
        slot = self._slot()
        cpus = self.slots[slot]
        threads = self.threads_for(slot)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "QTUNE_TERMINATION_LOG": str(folder / TERMINATION_FILE)}
        log_file = open(folder / "log.txt", "wb")  # noqa: SIM115 - closed when the unit ends
        parent = os.getpid()

        def in_child() -> None:  # runs in the child before exec
            os.setsid()
            try:
                ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            except (OSError, AttributeError):
                pass
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)
            try:
                os.sched_setaffinity(0, cpus)
            except OSError:
                pass

        process = subprocess.Popen(self.command(unit, folder, threads), stdout=log_file, stderr=subprocess.STDOUT,
                                   env=env, preexec_fn=in_child)
        timeout = unit_timeout_seconds(unit.kind, self.trial_timeout)
        self.units[unit.id] = RunningUnit(unit, process, slot, time.monotonic(), folder, timeout, log_file)
        logger.debug("%s started (pid %d, cpus %s)", unit.id, process.pid, cpus)

    def _kill(self, running: RunningUnit) -> None:
        try:
            os.killpg(running.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        running.process.wait()

    def _collect(self, running: RunningUnit, timed_out: bool) -> UnitOutcome:
        running.log_file.close()
        unit = running.unit
        if timed_out:
            return UnitOutcome(unit.id, UnitFailure("Timeout", f"{unit.id} exceeded its {running.timeout:g}s limit "
                                                               "(from spec.tuning.trialTimeoutSeconds) and was killed"))
        result_file = running.folder / RESULT_FILE
        if result_file.exists():
            data = json.loads(result_file.read_text())
            if unit.id == UnitKind.BASELINE:
                baseline = BaselineResult.model_validate(data)
                space = None
                space_file = self.workspace / "space.json"
                if baseline.status == "succeeded" and space_file.exists():
                    space = codec.load(TuningSpace, json.loads(space_file.read_text()))
                return UnitOutcome(unit.id, baseline, space)
            if unit.id == UnitKind.CONFIRM:
                return UnitOutcome(unit.id, ConfirmResult.model_validate(data))
            return UnitOutcome(unit.id, TrialResult.model_validate(data))
        code = running.process.returncode
        reason, message = parse_termination(_read(running.folder / TERMINATION_FILE))
        message = message or _log_tail(running.folder / "log.txt")
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            reason = "OOMKilled" if -code == signal.SIGKILL else "Crashed"
            return UnitOutcome(unit.id, UnitFailure(reason, f"killed by {name}; {message}"))
        if code == EXIT_JOB_UNUSABLE and message:
            return UnitOutcome(unit.id, UnitFailure(reason or INVALID_SPEC, message))
        return UnitOutcome(unit.id, UnitFailure("Crashed", f"{unit.id} ended with exit code {code}: {message}"))

    def poll(self, wait: float = 0.2) -> list[UnitOutcome]:
        """Finished units, in unit-id order; waits up to `wait` seconds for one."""
        deadline = time.monotonic() + wait
        while True:
            done: list[tuple[str, UnitOutcome]] = []
            for unit_id, running in sorted(self.units.items()):
                timed_out = time.monotonic() - running.started > running.timeout
                if running.process.poll() is None and not timed_out:
                    continue
                if timed_out and running.process.poll() is None:
                    self._kill(running)
                else:
                    timed_out = False
                done.append((unit_id, self._collect(running, timed_out)))
            for unit_id, _ in done:
                del self.units[unit_id]
            if done or not self.units or time.monotonic() >= deadline:
                return [outcome for _, outcome in done]
            time.sleep(0.05)

    def cancel(self, unit_ids: list[str]) -> None:
        for unit_id in unit_ids:
            running = self.units.pop(unit_id, None)
            if running is not None:
                self._kill(running)
                running.log_file.close()

    def stop_all(self) -> list[str]:
        """Kill every running unit (interrupt); returns their ids."""
        stopped = sorted(self.units)
        self.cancel(stopped)
        return stopped


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()[:2000]
    except OSError:
        return ""


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-1000:]
