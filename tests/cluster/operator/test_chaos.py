"""Chaos on the test plane (issue 12, "done when"): every fault at once, on real jobs.

One run, about 13 minutes, shared by every test of this module (the module-scoped ``chaos``
fixture). The run is a sequence of named phases, each run once, in order, by the first test that
needs it (so each test's duration is its phase's):

* setup: job `chaos-a` (digits, 8 trials, 2 at a time), job `chaos-oom` whose trials allocate past
  their memory limit (its metric module does, in trial pods only) and are OOM-killed, and job
  `chaos-nowhere` that asks for a node pool that does not exist;
* "node lost": the node chaos-a's first trial runs on is lost, mid-trial;
* "outage": Prometheus is stopped for 10 minutes while chaos-a's trials finish; during it the
  operator is SIGKILLed and started again, and the Pushgateway is restarted while it holds results
  not yet recorded;
* "chaos-a finished" and "chaos-oom finished": both jobs reach a final state.

Each test checks one thing the run should show: every finished trial is recorded exactly once (none
lost to the outage, none twice), the OOM kill is recorded with the right reason and message, the
unschedulable job says why in its status, and the operator was only ever restarted by the test. A
phase whose actions break (a wait times out, a component does not stop) fails the test that ran it;
the tests of later phases then fail naming it, while the checks of the phases that did run still
report. The figures of the run are printed and written to `$QTUNE_CHAOS_REPORT` (default: the
module's tmp folder) at the end of the module.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
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
OPERATOR_FLAGS = ("--keep-succeeded-pods", "--unschedulable-seconds", "5", "--node-lost-seconds", "5",
                  "--terminating-margin-seconds", "5", "--pushed-results-only")
"""--pushed-results-only: the outage is a test of the Prometheus path (with the termination message, results
would not wait for Prometheus at all)."""
NODE_LOST, OUTAGE, A_FINISHED, OOM_FINISHED = "node lost", "outage", "chaos-a finished", "chaos-oom finished"


def _pods(cluster: Any, namespace: str, uid: str, role: str | None = None) -> list[Any]:
    selector = f"{c.LABEL_JOB_UID}={uid}" + (f",{c.LABEL_ROLE}={role}" if role else "")
    return client.CoreV1Api(cluster.api_client()).list_namespaced_pod(namespace, label_selector=selector).items


def _uid(cluster: Any, namespace: str, name: str) -> str:
    return opcluster.get_job(cluster, namespace, name)["metadata"]["uid"]


def _groups(cluster: Any, uid: str) -> list[str]:
    return opcluster.pushgateway_groups(cluster, uid)


class ChaosRun:
    """The one chaos run of this module: its phases' actions, and what they observed for the tests."""

    def __init__(self, cluster: Any, namespace: str, operator: opcluster.OperatorProcess) -> None:
        self.cluster, self.plane, self.ns, self.operator = cluster, cluster.plane, namespace, operator
        self.t0 = time.monotonic()
        self.figures: dict[str, Any] = {"outage_seconds": OUTAGE_SECONDS}
        self.phases: dict[str, Callable[[], None]] = {
            NODE_LOST: self._lose_node, OUTAGE: self._outage,
            A_FINISHED: self._finish_a, OOM_FINISHED: self._finish_oom}
        self.broken: dict[str, BaseException | None] = {}  # phase -> what broke it (None: ran through)
        self.uid_a = ""
        # seen during the outage
        self.killed_operator = self.restarted_pushgateway = False
        self.unschedulable_message = self.waiting_seen = ""
        self.history_during: list[dict[str, Any]] = []
        # seen once the jobs finished
        self.status_a: dict[str, Any] = {}
        self.history_a: list[dict[str, Any]] = []
        self.trial_pods_a: list[Any] = []
        self.status_o: dict[str, Any] = {}
        self.history_o: list[dict[str, Any]] = []

    def mark(self, what: str) -> None:
        self.figures.setdefault("timeline", []).append((round(time.monotonic() - self.t0, 1), what))
        sys.stderr.write(f"[chaos {time.monotonic() - self.t0:7.1f}s] {what}\n")

    def reach(self, phase: str) -> None:
        """Run the phases up to ``phase`` that have not run yet, in order; fail, naming it, if one broke.

        The phase that breaks fails the test that ran it with its own error; a test needing that
        phase (or a later one) afterwards fails saying which phase broke and how.
        """
        names = list(self.phases)
        for name in names[: names.index(phase) + 1]:
            if name not in self.broken:
                try:
                    self.phases[name]()
                except BaseException as err:
                    self.broken[name] = err
                    self.mark(f"phase {name!r} broke: {type(err).__name__}: {err}")
                    raise
                self.broken[name] = None
            if (err := self.broken[name]) is not None:
                after = "" if name == phase else f", so the later phase {phase!r} this test checks never ran"
                pytest.fail(f"the chaos phase {name!r} broke earlier{after}: {type(err).__name__}: {err}")

    def create_jobs(self) -> None:
        cluster, ns = self.cluster, self.ns
        opcluster.create_job(cluster, ns, opcluster.job_manifest("chaos-a", maxTrials=8, parallelTrials=2))
        oom = opcluster.job_manifest("chaos-oom", maxTrials=3, parallelTrials=1)
        oom["spec"]["data"]["evaluation"]["metric"] = "hog:Top1"
        oom["spec"]["trial"]["resources"]["memory"] = "1Gi"
        opcluster.create_job(cluster, ns, oom)
        nowhere = opcluster.job_manifest("chaos-nowhere", maxTrials=1, parallelTrials=1)
        nowhere["spec"]["trial"]["nodeSelector"] = {"qtune.io/pool": "does-not-exist"}
        opcluster.create_job(cluster, ns, nowhere)
        self.uid_a = _uid(cluster, ns, "chaos-a")
        self.mark("operator up; jobs chaos-a, chaos-oom, chaos-nowhere created")

    def _lose_node(self) -> None:
        """A node agent stops serving the node of chaos-a's first trial, mid-trial."""
        cluster, ns, uid_a = self.cluster, self.ns, self.uid_a
        placed: list[str] = []

        def trial_placed() -> bool:
            pods = [p for p in _pods(cluster, ns, uid_a, "trial") if p.metadata.name == "chaos-a-trial-0"]
            if pods and pods[0].spec.node_name:
                placed[:] = [pods[0].spec.node_name]
                return True
            return False

        wait_for(trial_placed, 300, "chaos-a trial 0 placed on a node", interval=0.05)
        self.plane.lose_node(placed[0])
        self.mark(f"node {placed[0]} lost under chaos-a-trial-0")
        try:
            wait_for(lambda: any(p.metadata.name == "chaos-a-trial-0-a1" for p in _pods(cluster, ns, uid_a, "trial")),
                     120, "chaos-a trial 0 started again", interval=0.5)
            self.mark("chaos-a-trial-0 replaced (attempt 1)")
        finally:
            self.plane.lose_node(placed[0], lost=False)

    def _outage(self) -> None:
        """Prometheus down for the outage, with trials of chaos-a running."""
        wait_for(lambda: any(p.status.phase == "Running" for p in _pods(self.cluster, self.ns, self.uid_a, "trial")),
                 120, "a chaos-a trial running", interval=0.3)
        self.plane.stop_component("prometheus")
        down_at = time.monotonic()
        self.mark("Prometheus stopped")
        try:
            while time.monotonic() - down_at < OUTAGE_SECONDS:
                self._outage_step(down_at)
                time.sleep(2)
            self.history_during = _history(self.cluster, self.ns, "chaos-a")
            statuses: dict[str, int] = {}
            for trial in self.history_during:
                statuses[trial["status"]] = statuses.get(trial["status"], 0) + 1
            self.figures["chaos_a_trials_by_status_at_the_end_of_the_outage"] = statuses
        finally:
            self.plane.start_component("prometheus")
        self.mark("Prometheus started again")
        self.figures["unschedulable_message"] = self.unschedulable_message

    def _outage_step(self, down_at: float) -> None:
        """One look during the outage: the jobs' statuses; the operator's SIGKILL, then the Pushgateway's restart."""
        cluster, ns, uid_a = self.cluster, self.ns, self.uid_a
        status_a = _status(cluster, ns, "chaos-a")
        if status_a.get("reason") == "WaitingForResults":
            self.waiting_seen = status_a.get("message", "")
        status_n = _status(cluster, ns, "chaos-nowhere")
        if status_n.get("reason") == "Unschedulable" and not self.unschedulable_message:
            self.unschedulable_message = status_n.get("message", "")
            self.mark("chaos-nowhere: Unschedulable in its status")
        succeeded = [p for p in _pods(cluster, ns, uid_a, "trial") if p.status.phase == "Succeeded"]
        if not self.killed_operator and (succeeded or time.monotonic() - down_at > 120):
            self.operator.kill()
            self.mark(f"operator SIGKILLed ({len(succeeded)} chaos-a trial pod(s) succeeded so far)")
            time.sleep(5)
            self.operator.start()
            self.killed_operator = True
            self.mark("operator started again")
        elif self.killed_operator and not self.restarted_pushgateway and succeeded and _groups(cluster, uid_a):
            pending = sorted(_groups(cluster, uid_a))
            self.plane.restart_pushgateway()
            self.restarted_pushgateway = True
            after = sorted(_groups(cluster, uid_a))
            self.figures["pushgateway_groups_before_after_restart"] = [pending, after]
            self.mark(f"Pushgateway restarted holding {pending}; after the restart: {after}")

    def _finish_a(self) -> None:
        back = time.monotonic()
        self.status_a = _wait_state(self.cluster, self.ns, "chaos-a", {"Succeeded", "Failed"}, 600)
        self.figures["chaos_a_finished_after_outage_seconds"] = round(time.monotonic() - back, 1)
        self.mark(f"chaos-a {self.status_a['state']} ({self.status_a.get('reason')})")
        self.history_a = _history(self.cluster, self.ns, "chaos-a")
        self.trial_pods_a = _pods(self.cluster, self.ns, self.uid_a, "trial")
        self.figures["chaos_a_trial_pods"] = sorted(p.metadata.name for p in self.trial_pods_a)

    def _finish_oom(self) -> None:
        self.status_o = _wait_state(self.cluster, self.ns, "chaos-oom", {"Succeeded", "Failed"}, 300)
        self.mark(f"chaos-oom {self.status_o['state']} ({self.status_o.get('reason')})")
        self.history_o = _history(self.cluster, self.ns, "chaos-oom")
        self.figures["chaos_oom"] = {"state": self.status_o["state"], "reason": self.status_o.get("reason"),
                                     "oom_trials": len(oom_killed(self.history_o))}

    def write_report(self, default: Path) -> None:
        names = list(self.phases)
        self.figures["phases"] = {name: "not run" if name not in self.broken else
                                  "ran through" if self.broken[name] is None else f"broke: {self.broken[name]}"
                                  for name in names}
        self.figures["operator_starts"] = self.operator.starts
        self.figures["total_seconds"] = round(time.monotonic() - self.t0, 1)
        report = Path(os.environ.get("QTUNE_CHAOS_REPORT", default))
        report.write_text(json.dumps(self.figures, indent=1))
        sys.stderr.write(f"chaos figures ({report}):\n{json.dumps(self.figures, indent=1)}\n")


def oom_killed(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [t for t in history if t.get("reason") == "OOMKilled"]


@pytest.fixture(scope="module")
def chaos(cluster: Any, crds: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosRun]:
    """The operator on a fresh namespace with the three chaos jobs created; the phases run on demand."""
    if cluster.state_dir is None:
        pytest.skip("needs the test plane's node agent (PVC host folders)")
    if cluster.plane is None:
        pytest.fail("the chaos test needs the test plane (it stops and starts its components)")
    ns = cluster.create_namespace(prefix="qtune-op-")
    tmp = tmp_path_factory.mktemp("chaos")
    operator = opcluster.OperatorProcess(cluster, [ns], tmp, *OPERATOR_FLAGS, name="operator")
    try:
        workspace = opcluster.prepare_workspace(cluster, ns)
        run = ChaosRun(cluster, ns, operator)
        (workspace / "hog.py").write_text(HOG)
        operator.start()
        run.create_jobs()
        try:
            yield run
        finally:
            run.write_report(tmp / "chaos.json")
    finally:
        operator.stop()
        sys.stderr.write(f"--- {operator.log_path} (tail)\n{operator.log_tail(25)}\n")
        cluster.delete_namespace(ns)


def test_node_lost_under_a_trial_starts_it_again(chaos: ChaosRun) -> None:
    """chaos-a-trial-0's node is lost mid-trial: the trial starts again as attempt 1 (a1)."""
    chaos.reach(NODE_LOST)


def test_outage_saw_the_operator_sigkilled_and_the_pushgateway_restarted(chaos: ChaosRun) -> None:
    """The run's own faults happened: without them the other outage checks prove nothing."""
    chaos.reach(OUTAGE)
    assert chaos.killed_operator and chaos.restarted_pushgateway, chaos.figures


def test_no_trial_failed_for_metrics_unavailable_during_the_outage(chaos: ChaosRun) -> None:
    chaos.reach(OUTAGE)
    assert all(t["status"] != "failed" or t.get("reason") != "MetricsUnavailable" for t in chaos.history_during), \
        chaos.history_during


def test_status_said_waiting_for_results_during_the_outage(chaos: ChaosRun) -> None:
    chaos.reach(OUTAGE)
    assert "trial-" in chaos.waiting_seen, "chaos-a's status said it waits for results during the outage"


def test_unschedulable_job_says_why_in_its_status(chaos: ChaosRun) -> None:
    """chaos-nowhere asks for a pool no node has: its status said so (seen during the outage)."""
    chaos.reach(OUTAGE)
    assert "nodes are available" in chaos.unschedulable_message, chaos.unschedulable_message


def test_chaos_a_succeeded_after_the_outage(chaos: ChaosRun) -> None:
    chaos.reach(A_FINISHED)
    assert chaos.status_a["state"] == "Succeeded", chaos.status_a


def test_every_chaos_a_trial_recorded_exactly_once(chaos: ChaosRun) -> None:
    """None lost to the outage, none twice; every trial pod that succeeded is a recorded trial, and at
    most one pod succeeded per trial."""
    chaos.reach(A_FINISHED)
    history = chaos.history_a
    indices = [t["index"] for t in history]
    assert sorted(indices) == list(range(8)) == sorted(set(indices)), indices
    assert [t["status"] for t in history] == ["succeeded"] * 8, history
    succeeded_units = [p.metadata.labels[c.LABEL_UNIT] for p in chaos.trial_pods_a if p.status.phase == "Succeeded"]
    assert sorted(succeeded_units) == sorted(set(succeeded_units)), succeeded_units
    assert {int(u.split("-")[1]) for u in succeeded_units} <= set(indices)


def test_oom_kill_recorded_with_reason_and_message(chaos: ChaosRun) -> None:
    chaos.reach(OOM_FINISHED)
    oom_trials = oom_killed(chaos.history_o)
    assert oom_trials, chaos.history_o
    assert "exceeding its memory limit of 1Gi" in oom_trials[0]["message"], oom_trials[0]
    assert chaos.status_o["reason"] == "RepeatedFailures", chaos.status_o


def test_operator_only_restarted_by_the_test(chaos: ChaosRun) -> None:
    """No input ever ended the operator, over the whole run: the one restart was the test's SIGKILL."""
    chaos.reach(OOM_FINISHED)
    operator = chaos.operator
    assert operator.proc is not None and operator.proc.poll() is None, operator.log_tail()
    assert operator.starts == 2
