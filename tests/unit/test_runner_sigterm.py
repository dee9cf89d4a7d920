"""The runner stops on SIGTERM even as PID 1 of a container (a pid namespace of its own), as the
kubelet runs it: Linux delivers a namespace's init no signal it has no handler for (pid_namespaces(7)),
so without the runner's handler a deleted trial pod ran on, and pushed its result, until SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PID1 = """
import sys, time
if sys.argv[1] == "handler":
    from qtune.runner.__main__ import install_sigterm_handler
    install_sigterm_handler()
print("ready", flush=True)
time.sleep(30)
"""


def _as_pid1(mode: str) -> tuple[subprocess.Popen[str], int]:
    """python as PID 1 of a new pid namespace (unshare --pid --fork): (unshare, the child's host pid)."""
    assert shutil.which("unshare"), "unshare (util-linux) is needed"
    proc = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c", PID1, mode],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 1, children
    child = int(children[0])
    status = Path(f"/proc/{child}/status").read_text()
    nspid = next(line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:"))
    assert nspid[-1] == "1", nspid  # PID 1 in its own namespace
    return proc, child


def test_pid1_without_handler_ignores_sigterm() -> None:
    """The premise: the kernel drops SIGTERM to a namespace's init that has no handler."""
    assert os.geteuid() == 0, "a pid namespace needs root (CI runs as root)"
    proc, child = _as_pid1("plain")
    try:
        os.kill(child, signal.SIGTERM)
        time.sleep(1.5)
        assert proc.poll() is None, "SIGTERM ended a PID 1 that has no handler"
    finally:
        proc.kill()
        proc.wait(10)


def test_runner_as_pid1_stops_on_sigterm() -> None:
    assert os.geteuid() == 0, "a pid namespace needs root (CI runs as root)"
    proc, child = _as_pid1("handler")
    try:
        t0 = time.monotonic()
        os.kill(child, signal.SIGTERM)
        assert proc.wait(10) == 128 + signal.SIGTERM
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
