"""A real prometheus-pushgateway process, and the results gateway in front of one, on free local ports (tests of
the result channel)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

needs_pushgateway = pytest.mark.skipif(
    shutil.which("prometheus-pushgateway") is None and os.environ.get("QTUNE_REQUIRE_CLUSTER") != "1",
    reason="no prometheus-pushgateway installed (scripts/setup.sh installs it; with QTUNE_REQUIRE_CLUSTER=1, as "
           "scripts/test.sh runs, the test fails instead of skipping)")
"""Tests of the real Pushgateway: skipped only where it may be missing; scripts/test.sh requires it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def real_pushgateway(timeout: float = 20.0) -> Iterator[str]:
    """Start `prometheus-pushgateway` (no persistence), wait until it is ready, yield its URL, stop it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{port}",
                             "--persistence.file="],  # Debian's default persists in /var/lib/prometheus
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                requests.get(f"{url}/-/ready", timeout=1).raise_for_status()
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            requests.get(url, timeout=1).raise_for_status()
            return
        except requests.RequestException:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} not ready (exit code {proc.poll()})") from None
            time.sleep(0.1)


@contextmanager
def results_gateway(upstream: str, signing_key: str, *, read_token: str = "", host: str = "127.0.0.1",
                    port: int | None = None, timeout: float = 30.0) -> Iterator[str]:
    """Run `qtune results-gateway` (this checkout's code) in front of `upstream` with the operator's key; yield
    its URL. For tests, and for a test plane that sends pods through the gateway (listen on an address they
    reach: `host`)."""
    port = port or free_port()
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "QTUNE_SIGNING_KEY": signing_key, "QTUNE_RESULTS_READ_TOKEN": read_token,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", "qtune.cli.main", "results-gateway", f"--upstream={upstream}",
                             f"--host={host}", f"--port={port}"], env=env, cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
        _wait_ready(f"{url}/healthz", proc, timeout)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
