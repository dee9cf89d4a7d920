"""The runner's result push (issue 12): retried with a bounded backoff on connection errors and
5xx answers, final on 4xx. The operator believes a signed result from the pod's termination message
first (issue 20), so a push that never gets through leaves the signed result there and the unit
succeeds; a result too large for the termination message fails the unit (PushFailed), the baseline's
too. Against a local HTTP server that fails the first attempts."""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from qtune import protocol
from qtune.runner import __main__ as runner
from qtune.runner import metrics


class Gateway:
    """A Pushgateway stand-in: answers `fail_status` to the first `failures` pushes, then 200."""

    def __init__(self, failures: int, fail_status: int = 503) -> None:
        self.failures, self.fail_status, self.requests = failures, fail_status, []
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                gateway.requests.append((self.path, body))
                status = gateway.fail_status if len(gateway.requests) <= gateway.failures else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gateway_factory() -> Iterator[Any]:
    made: list[Gateway] = []

    def make(failures: int, fail_status: int = 503) -> Gateway:
        made.append(Gateway(failures, fail_status))
        return made[-1]

    yield make
    for gateway in made:
        gateway.close()


def closed_port_url() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


TRIAL = {"trial": 3, "status": "succeeded", "accuracy": 0.9}
UNFIT = [secrets.token_hex(4096)]
"""Notes no termination message holds (random hex does not compress below the 4096 bytes kept)."""


def test_push_retries_through_5xx_with_backoff(gateway_factory: Any) -> None:
    gateway, sleeps = gateway_factory(3), []
    metrics.push_result(gateway.url, "uid-1", 3, TRIAL, secret="s", sleep=sleeps.append)
    assert len(gateway.requests) == 4, "three 503s, then the push that succeeds"
    assert sleeps == [2.0, 4.0, 8.0]
    assert "/job_uid/uid-1/unit/trial-3" in gateway.requests[-1][0]
    assert b"qtune_result_accuracy" in gateway.requests[-1][1]


def test_push_retries_connection_errors_through_a_long_outage_and_is_bounded() -> None:
    sleeps: list[float] = []
    with pytest.raises(OSError):
        metrics.push_result(closed_port_url(), "uid-1", 3, TRIAL, secret="s", sleep=sleeps.append)
    assert sleeps[:5] == [2.0, 4.0, 8.0, 16.0, 30.0] and max(sleeps) == 30.0, "capped backoff"
    assert 870 <= sum(sleeps) <= metrics.PUSH_RETRY_SECONDS == 900, "retried for about 15 minutes, no longer"


def test_push_retry_total_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setenv(metrics.PUSH_RETRY_ENV, "60")
    with pytest.raises(OSError):
        metrics.push_result(closed_port_url(), "uid-1", 3, TRIAL, secret="s", sleep=sleeps.append)
    assert sleeps == [2.0, 4.0, 8.0, 16.0, 30.0] and sum(sleeps) <= 60
    monkeypatch.setenv(metrics.PUSH_RETRY_ENV, "soon")
    with pytest.raises(ValueError, match="QTUNE_PUSH_RETRY_SECONDS"):
        metrics.push_result(closed_port_url(), "uid-1", 3, TRIAL, secret="s", sleep=sleeps.append)


def test_a_push_survives_a_gateway_outage_of_several_minutes(gateway_factory: Any) -> None:
    gateway, sleeps = gateway_factory(20), []          # down for 20 attempts: about 8 minutes of backoff
    metrics.push_result(gateway.url, "uid-1", 3, TRIAL, secret="s", sleep=sleeps.append)
    assert len(gateway.requests) == 21 and sum(sleeps) > 5 * 60


def test_a_4xx_answer_is_not_retried(gateway_factory: Any) -> None:
    gateway, sleeps = gateway_factory(10, fail_status=400), []
    with pytest.raises(OSError):
        metrics.push_result(gateway.url, "uid-1", 3, TRIAL, secret="s", sleep=sleeps.append)
    assert len(gateway.requests) == 1 and sleeps == []


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "PUSH_BACKOFF", 0.0)
    monkeypatch.setattr(metrics, "PUSH_MAX_DELAY", 0.0)
    monkeypatch.setenv(metrics.PUSH_RETRY_ENV, "0.5")


def _main(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: str, result: Any, gateway: str,
          *extra: str) -> tuple[int, dict[str, Any], str]:
    monkeypatch.setattr(runner, "_run", lambda args: result)
    termination = tmp_path / "termination-log"
    monkeypatch.setenv("QTUNE_TERMINATION_LOG", str(termination))
    monkeypatch.setenv("QTUNE_RESULT_SECRET", "s")
    out = tmp_path / "result.json"
    code = runner.main([command, "--job-json", "{}", "--workspace", str(tmp_path / "ws"), "--index", "3",
                        "--result", str(out), "--pushgateway", gateway, "--job-uid", "uid-1", *extra])
    return code, json.loads(out.read_text()), termination.read_text() if termination.exists() else ""


def test_a_baseline_that_published_its_configmap_still_fails_when_its_push_never_gets_through(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gateway_factory: Any, fast_retries: None) -> None:
    """A baseline whose result reaches the operator neither pushed nor in its termination message (too large)
    must say so at once (PushFailed, non-zero exit), not exit 0 and leave its job waiting for the results
    deadline."""
    gateway = gateway_factory(10**9, fail_status=500)  # never recovers
    baseline = protocol.BaselineResult(accuracy=0.97, metric="top1", message=UNFIT[0])
    code, _, termination = _main(monkeypatch, tmp_path, "baseline", baseline, gateway.url,
                                 "--publish-configmap", "job-baseline")
    assert code != protocol.EXIT_OK and termination.startswith("PushFailed: ")
    assert len(gateway.requests) > 1, "retried before giving up"


def test_a_trial_push_that_recovers_succeeds_and_one_that_never_does_fails_cleanly(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gateway_factory: Any, fast_retries: None) -> None:
    trial = protocol.TrialResult(trial=3, status="succeeded", accuracy=0.9)
    code, _, _ = _main(monkeypatch, tmp_path, "trial", trial, gateway_factory(2).url)
    assert code == protocol.EXIT_OK
    # a push that never gets through, of a result no termination message holds: a clean failure naming why
    unfit = protocol.TrialResult(trial=3, status="succeeded", accuracy=0.9, notes=UNFIT)
    code, _, termination = _main(monkeypatch, tmp_path, "trial", unfit, closed_port_url())
    assert code == protocol.EXIT_TRIAL_FAILED and termination.startswith("PushFailed: ")
    code, _, termination = _main(monkeypatch, tmp_path, "baseline",
                                 protocol.BaselineResult(accuracy=0.9, message=UNFIT[0]), closed_port_url())
    assert code != protocol.EXIT_OK and termination.startswith("PushFailed: ")


@pytest.mark.parametrize("status", [400, 500])
def test_a_push_that_never_gets_through_leaves_the_signed_result_in_the_termination_message(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gateway_factory: Any, fast_retries: None,
        status: int) -> None:
    """Issue 20: a Pushgateway that refuses the push (400: someone pushed a group whose series clash with the
    result's) or stays down does not fail the unit when its signed result fits in the termination message,
    the copy the operator believes first."""
    trial = protocol.TrialResult(trial=3, status="succeeded", accuracy=0.9)
    code, _, termination = _main(monkeypatch, tmp_path, "trial", trial, gateway_factory(10**9, status).url)
    assert code == protocol.EXIT_OK
    found = protocol.result_of_termination(termination)
    assert found is not None
    unit, result, signature = found
    assert unit == "trial-3" and result == trial
    assert protocol.verify_result("uid-1", unit, result, "s", signature)
    # without its secret a unit cannot sign, so nothing but a push could deliver it: PushFailed
    monkeypatch.setattr(runner, "_terminate_unpushed", lambda *args: False)
    code, _, termination = _main(monkeypatch, tmp_path, "trial", trial, gateway_factory(10**9, status).url)
    assert code == protocol.EXIT_TRIAL_FAILED and termination.startswith("PushFailed: ")
