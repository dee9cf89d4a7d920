"""Where the operator's /healthz and /metrics listen: the bind-address setting (default 0.0.0.0, as the
kubelet probes the pod IP; 127.0.0.1 for a local run)."""

from __future__ import annotations

import socket
import urllib.request
from typing import Any

import kopf
import pytest

from qtune.operator import main
from qtune.operator.config import OperatorConfig
from qtune.operator.metrics import OperatorMetrics


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _other_address() -> str | None:
    """An address of this machine that is not loopback (None when it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))
            address = sock.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_the_bind_address_is_a_setting_with_flag_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert OperatorConfig().bind_address == "0.0.0.0"
    monkeypatch.setenv("QTUNE_BIND_ADDRESS", "127.0.0.1")
    assert OperatorConfig.from_env().bind_address == "127.0.0.1"
    args = main.build_parser().parse_args(["--bind-address", "::1"])
    assert main.config_from_args(args).bind_address == "::1"


def test_run_serves_metrics_and_health_on_the_bind_address(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    async def operator(**kwargs: Any) -> None:  # stands in for Kopf's loop: only its arguments are checked
        seen.update(kwargs)

    monkeypatch.setattr(kopf, "operator", operator)
    metrics_port, health_port = _free_port(), _free_port()
    config = OperatorConfig(bind_address="127.0.0.1", signing_key="k" * 64, prometheus_url="http://prom:9090")
    main.run(config=config, metrics_port=metrics_port, health_port=health_port)
    assert seen["liveness_endpoint"] == f"http://127.0.0.1:{health_port}/healthz"
    server = seen["memo"].metrics.server
    try:
        assert server.server_address[:2] == ("127.0.0.1", metrics_port)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            assert b"qtune_operator_jobs" in response.read()
        other = _other_address()
        if other is not None:  # not reachable on the machine's other addresses
            with pytest.raises(OSError):
                socket.create_connection((other, metrics_port), timeout=2).close()
    finally:
        server.shutdown()
        server.server_close()


def test_the_default_listens_everywhere_and_ipv6_is_bracketed() -> None:
    assert main.liveness_endpoint("0.0.0.0", 8080) == "http://0.0.0.0:8080/healthz"
    assert main.liveness_endpoint("::1", 8080) == "http://[::1]:8080/healthz"
    assert main.liveness_endpoint("127.0.0.1", 0) is None
    metrics = OperatorMetrics()
    server = metrics.serve(0, "0.0.0.0")
    try:
        assert server.server_address[0] == "0.0.0.0"
    finally:
        server.shutdown()
        server.server_close()
