"""Chaos on the test plane (issue 12, "done when"): every fault at once, on real jobs.

One run, about 13 minutes:

* job `chaos-a` (digits, 8 trials, 2 at a time) loses the node its first trial runs on;
* Prometheus is then stopped for 10 minutes while `chaos-a`'s trials finish;
* during the outage the operator is SIGKILLed and started again, and the Pushgateway is restarted
  while it holds results not yet recorded;
* job `chaos-oom`'s trials allocate past their memory limit (its metric module does, in trial pods
  only) and are OOM-killed;
* job `chaos-nowhere` asks for a node pool that does not exist.

Then: every finished trial is recorded exactly once (none lost to the outage, none twice), the
OOM kill is recorded with the right reason and message, the unschedulable job says why in its
status, and the operator was only ever restarted by the test. The figures of the run are printed
and written to `$QTUNE_CHAOS_REPORT` (default: the test's tmp folder) for the record.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import opcluster
import pytest
from clusterlib import wait_for
from kubernetes import client
from metric_modules import HOG
from test_operator_e2e import _history, _status, _wait_state

from qtune.operator import constants as c

OUTAGE_SECONDS = float(os.environ.get("QTUNE_CHAOS_OUTAGE_SECONDS", "600"))


def _pods(cluster: Any, namespace: str, uid: str, role: str | None = None) -> list[Any]:
    selector = f"{c.LABEL_JOB_UID}={uid}" + (f",{c.LABEL_ROLE}={role}" if role else "")
    return client.CoreV1Api(cluster.api_client()).list_namespaced_pod(namespace, label_selector=selector).items


def _uid(cluster: Any, namespace: str, name: str) -> str:
    return opcluster.get_job(cluster, namespace, name)["metadata"]["uid"]


def _groups(cluster: Any, uid: str) -> list[str]:
    return opcluster.pushgateway_groups(cluster, uid)


def test_every_fault_at_once(cluster: Any, op_namespace: str, workspace: Path, start_operator: Any,
                             tmp_path: Path) -> None:
    plane = cluster.plane
    if plane is None:
        pytest.fail("the chaos test needs the test plane (it stops and starts its components)")
    ns = op_namespace
    t0 = time.monotonic()
    figures: dict[str, Any] = {"outage_seconds": OUTAGE_SECONDS}

    def mark(what: str) -> None:
        figures.setdefault("timeline", []).append((round(time.monotonic() - t0, 1), what))
        sys.stderr.write(f"[chaos {time.monotonic() - t0:7.1f}s] {what}\n")

    (workspace / "hog.py").write_text(HOG)
    flags = ("--keep-succeeded-pods", "--unschedulable-seconds", "5", "--node-lost-seconds", "5",
             "--terminating-margin-seconds", "5")
    operator = start_operator([ns], *flags)

    opcluster.create_job(cluster, ns, opcluster.job_manifest("chaos-a", maxTrials=8, parallelTrials=2))
    oom = opcluster.job_manifest("chaos-oom", maxTrials=3, parallelTrials=1)
    oom["spec"]["data"]["evaluation"]["metric"] = "hog:Top1"
    oom["spec"]["trial"]["resources"]["memory"] = "1Gi"
    opcluster.create_job(cluster, ns, oom)
    nowhere = opcluster.job_manifest("chaos-nowhere", maxTrials=1, parallelTrials=1)
    nowhere["spec"]["trial"]["nodeSelector"] = {"qtune.io/pool": "does-not-exist"}
    opcluster.create_job(cluster, ns, nowhere)
    uid_a = _uid(cluster, ns, "chaos-a")
    mark("operator up; jobs chaos-a, chaos-oom, chaos-nowhere created")

    # 1. a node agent stops serving the node of chaos-a's first trial, mid-trial
    placed: list[str] = []

    def trial_placed() -> bool:
        pods = [p for p in _pods(cluster, ns, uid_a, "trial") if p.metadata.name == "chaos-a-trial-0"]
        if pods and pods[0].spec.node_name:
            placed[:] = [pods[0].spec.node_name]
            return True
        return False

    wait_for(trial_placed, 300, "chaos-a trial 0 placed on a node", interval=0.05)
    plane.lose_node(placed[0])
    mark(f"node {placed[0]} lost under chaos-a-trial-0")
    try:
        wait_for(lambda: any(p.metadata.name == "chaos-a-trial-0-a1" for p in _pods(cluster, ns, uid_a, "trial")),
                 120, "chaos-a trial 0 started again", interval=0.5)
        mark("chaos-a-trial-0 replaced (attempt 1)")
    finally:
        plane.lose_node(placed[0], lost=False)

    # 2. Prometheus down for the outage, with trials of chaos-a running
    wait_for(lambda: any(p.status.phase == "Running" for p in _pods(cluster, ns, uid_a, "trial")), 120,
             "a chaos-a trial running", interval=0.3)
    plane.stop_component("prometheus")
    down_at = time.monotonic()
    mark("Prometheus stopped")
    restarted_pushgateway = False
    killed_operator = False
    unschedulable_message = ""
    waiting_seen = ""
    try:
        while time.monotonic() - down_at < OUTAGE_SECONDS:
            status_a = _status(cluster, ns, "chaos-a")
            if status_a.get("reason") == "WaitingForResults":
                waiting_seen = status_a.get("message", "")
            status_n = _status(cluster, ns, "chaos-nowhere")
            if status_n.get("reason") == "Unschedulable" and not unschedulable_message:
                unschedulable_message = status_n.get("message", "")
                mark("chaos-nowhere: Unschedulable in its status")
            succeeded = [p for p in _pods(cluster, ns, uid_a, "trial") if p.status.phase == "Succeeded"]
            if not killed_operator and (succeeded or time.monotonic() - down_at > 120):
                operator.kill()
                mark(f"operator SIGKILLed ({len(succeeded)} chaos-a trial pod(s) succeeded so far)")
                time.sleep(5)
                operator.start()
                killed_operator = True
                mark("operator started again")
            elif killed_operator and not restarted_pushgateway and succeeded and _groups(cluster, uid_a):
                pending = sorted(_groups(cluster, uid_a))
                plane.restart_pushgateway()
                restarted_pushgateway = True
                after = sorted(_groups(cluster, uid_a))
                figures["pushgateway_groups_before_after_restart"] = [pending, after]
                mark(f"Pushgateway restarted holding {pending}; after the restart: {after}")
            time.sleep(2)
        history_during = _history(cluster, ns, "chaos-a")
        statuses: dict[str, int] = {}
        for trial in history_during:
            statuses[trial["status"]] = statuses.get(trial["status"], 0) + 1
        figures["chaos_a_trials_by_status_at_the_end_of_the_outage"] = statuses
        assert all(t["status"] != "failed" or t.get("reason") != "MetricsUnavailable" for t in history_during), \
            history_during
    finally:
        plane.start_component("prometheus")
    mark("Prometheus started again")
    assert killed_operator and restarted_pushgateway, figures
    assert "trial-" in waiting_seen, "chaos-a's status said it waits for results during the outage"

    # 3. after the outage: everything recorded, exactly once
    back = time.monotonic()
    status_a = _wait_state(cluster, ns, "chaos-a", {"Succeeded", "Failed"}, 600)
    figures["chaos_a_finished_after_outage_seconds"] = round(time.monotonic() - back, 1)
    mark(f"chaos-a {status_a['state']} ({status_a.get('reason')})")
    assert status_a["state"] == "Succeeded", status_a
    history = _history(cluster, ns, "chaos-a")
    indices = [t["index"] for t in history]
    assert sorted(indices) == list(range(8)) == sorted(set(indices)), indices
    assert [t["status"] for t in history] == ["succeeded"] * 8, history
    # every trial pod that succeeded is a recorded trial; at most one succeeded pod per trial
    succeeded_units = [p.metadata.labels[c.LABEL_UNIT] for p in _pods(cluster, ns, uid_a, "trial")
                       if p.status.phase == "Succeeded"]
    assert sorted(succeeded_units) == sorted(set(succeeded_units)), succeeded_units
    assert {int(u.split("-")[1]) for u in succeeded_units} <= set(indices)
    figures["chaos_a_trial_pods"] = sorted(p.metadata.name for p in _pods(cluster, ns, uid_a, "trial"))

    status_o = _wait_state(cluster, ns, "chaos-oom", {"Succeeded", "Failed"}, 300)
    mark(f"chaos-oom {status_o['state']} ({status_o.get('reason')})")
    oom_trials = [t for t in _history(cluster, ns, "chaos-oom") if t.get("reason") == "OOMKilled"]
    assert oom_trials, _history(cluster, ns, "chaos-oom")
    assert "exceeding its memory limit of 1Gi" in oom_trials[0]["message"], oom_trials[0]
    assert status_o["reason"] == "RepeatedFailures", status_o
    figures["chaos_oom"] = {"state": status_o["state"], "reason": status_o["reason"], "oom_trials": len(oom_trials)}

    assert "nodes are available" in unschedulable_message, unschedulable_message
    figures["unschedulable_message"] = unschedulable_message

    # 4. no input ever ended the operator: the one restart was the test's SIGKILL
    assert operator.proc is not None and operator.proc.poll() is None, operator.log_tail()
    assert operator.starts == 2
    figures["operator_starts"] = operator.starts
    figures["total_seconds"] = round(time.monotonic() - t0, 1)
    report = Path(os.environ.get("QTUNE_CHAOS_REPORT", tmp_path / "chaos.json"))
    report.write_text(json.dumps(figures, indent=1))
    sys.stderr.write(f"chaos figures ({report}):\n{json.dumps(figures, indent=1)}\n")
