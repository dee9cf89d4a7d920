"""Local executor: each trial is a `python -m qtune.runner trial` child process.

A child per trial isolates crashes (a segfault in a framework fails one trial, not the run),
enforces the per-trial wall-clock limit (the process group is killed), and pins each running
trial to its own CPUs so that parallel trials do not disturb each other's latency.
"""

from __future__ import annotations

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

from qtune.tuning.history import FAILED, write_json_atomic

logger = logging.getLogger(__name__)


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


@dataclass
class RunningTrial:
    index: int
    process: subprocess.Popen[bytes]
    slot: int
    started: float
    trial_dir: Path
    log_file: Any = field(repr=False, default=None)


@dataclass
class LocalExecutor:
    job_file: Path
    base_dir: Path
    workspace: Path
    parallel: int
    trial_timeout: float
    threads: int | None = None
    running: dict[int, RunningTrial] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.slots = cpu_slots(self.parallel)

    def free_slots(self) -> int:
        return self.parallel - len(self.running)

    def _slot(self) -> int:
        used = {t.slot for t in self.running.values()}
        return next(i for i in range(self.parallel) if i not in used)

    def start(self, index: int, tune_config: dict[str, Any]) -> None:
        trial_dir = self.workspace / "trials" / str(index)
        trial_dir.mkdir(parents=True, exist_ok=True)
        (trial_dir / "result.json").unlink(missing_ok=True)
        config_file = trial_dir / "config.json"
        write_json_atomic(config_file, tune_config)
        slot = self._slot()
        cpus = self.slots[slot]
        threads = self.threads or len(cpus)
        command = [
            sys.executable, "-m", "qtune.runner", "trial",
            "--job", str(self.job_file), "--base-dir", str(self.base_dir),
            "--workspace", str(self.workspace), "--index", str(index),
            "--config", str(config_file), "--threads", str(threads),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "QTUNE_TERMINATION_LOG": str(trial_dir / "termination")}
        log_file = open(trial_dir / "log.txt", "wb")  # noqa: SIM115 - closed when the trial ends

        def pin() -> None:  # runs in the child before exec
            os.setsid()
            try:
                os.sched_setaffinity(0, cpus)
            except OSError:
                pass

        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, preexec_fn=pin)
        self.running[index] = RunningTrial(index, process, slot, time.monotonic(), trial_dir, log_file)
        logger.debug("trial %d started (pid %d, cpus %s)", index, process.pid, cpus)

    def _kill(self, trial: RunningTrial) -> None:
        try:
            os.killpg(trial.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        trial.process.wait()

    def _collect(self, trial: RunningTrial, timed_out: bool) -> dict[str, Any]:
        trial.log_file.close()
        result_file = trial.trial_dir / "result.json"
        if timed_out:
            return {"status": FAILED, "reason": "Timeout",
                    "message": f"trial exceeded {self.trial_timeout:g}s and was killed"}
        if result_file.exists():
            return json.loads(result_file.read_text())
        code = trial.process.returncode
        tail = _log_tail(trial.trial_dir / "log.txt")
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            reason = "OOMKilled" if -code == signal.SIGKILL else "Crashed"
            return {"status": FAILED, "reason": reason, "message": f"killed by {name}; {tail}"}
        return {"status": FAILED, "reason": "Crashed", "message": f"exit code {code}; {tail}"}

    def poll(self, wait: float = 0.2) -> list[tuple[int, dict[str, Any]]]:
        """Finished trials (index, result), in index order; waits up to `wait` seconds for one."""
        deadline = time.monotonic() + wait
        while True:
            done: list[tuple[int, dict[str, Any]]] = []
            for index, trial in sorted(self.running.items()):
                timed_out = time.monotonic() - trial.started > self.trial_timeout
                if trial.process.poll() is None and not timed_out:
                    continue
                if timed_out and trial.process.poll() is None:
                    self._kill(trial)
                done.append((index, self._collect(trial, timed_out)))
            for index, _ in done:
                del self.running[index]
            if done or not self.running or time.monotonic() >= deadline:
                return done
            time.sleep(0.05)

    def stop_all(self) -> list[int]:
        """Kill every running trial (timeout or interrupt); returns their indices."""
        stopped = sorted(self.running)
        for trial in self.running.values():
            self._kill(trial)
            trial.log_file.close()
        self.running.clear()
        return stopped


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-1000:]
