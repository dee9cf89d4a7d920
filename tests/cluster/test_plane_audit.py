"""The plane's audit option: the requests of the operator's own user, and only those, are logged
(what benchmarks/operator_fanout.py counts as "API requests per trial")."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import plane as plane_mod
import pytest


def _events(path: Path, want: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    events: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        if path.exists():
            events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if len(events) >= want:
                break
        time.sleep(0.2)
    return events


def test_audit_logs_the_operator_user_only() -> None:
    if missing := plane_mod.missing_binaries():
        pytest.skip("missing: " + ", ".join(missing))
    from kubernetes import client, config

    with plane_mod.running_plane(prometheus=False, node_agent=False, audit=True) as plane:
        with config.new_client_from_config(config_file=str(plane.operator_kubeconfig)) as api:
            core = client.CoreV1Api(api)
            core.list_namespaced_pod("default")
            core.create_namespaced_config_map("default", {"metadata": {"name": "audited"}, "data": {"a": "b"}})
        with plane.api_client() as admin:  # another user: not audited
            client.CoreV1Api(admin).list_namespace()
            client.CoreV1Api(admin).read_namespaced_config_map("audited", "default")
        events = _events(plane.audit_log, want=2)
    users = {e["user"]["username"] for e in events}
    assert users == {plane_mod.OPERATOR_USER}, users
    assert "system:masters" in events[0]["user"]["groups"]
    seen = {(e["verb"], e["objectRef"]["resource"]) for e in events if e.get("objectRef")}
    assert ("list", "pods") in seen and ("create", "configmaps") in seen, seen
    assert ("list", "namespaces") not in seen and ("get", "configmaps") not in seen
    assert all(e["level"] == "Metadata" and "requestObject" not in e for e in events)
