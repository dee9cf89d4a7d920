"""The operator's lifecycle under faults (issue 12), with the real reconciler and session against the
in-memory fakes and a clock: results that wait out a metrics outage, unschedulable and overdue pods,
pods on lost nodes or stuck terminating, unit Secrets that already exist, the results poller that
never dies, deleted jobs' Pushgateway groups, and jobs without a finalizer."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from kubernetes.client import ApiException
from opfakes import UID, inputs_of, job_body, make_config
from test_reconcile import BASELINE_POD, World, spec_dict

from qtune.operator import constants as c
from qtune.operator import status as st
from qtune.operator.config import OperatorConfig
from qtune.operator.nodes import NODE_CACHE_SECONDS
from qtune.operator.prom import PUSH_JOB, MetricsError, ResultsPoller
from qtune.operator.statuswriter import StatusWriter
from qtune.operator.sweep import GroupSweeper, orphan_groups


def _config(**changes: Any) -> OperatorConfig:
    return OperatorConfig(**{**make_config().__dict__, **changes})


def _iso(t: float) -> str:
    return st.now_iso(t)


class DownPrometheus:
    """Prometheus unreachable: every query fails."""

    def __init__(self, results: Any) -> None:
        self.inner = results
        self.down = True

    async def job_results(self, job_uid: str) -> dict[str, Any]:
        if self.down:
            raise MetricsError("Prometheus query failed (http://prom:9090/api/v1/query): Connection refused")
        return await self.inner.job_results(job_uid)


def _trial_finished_without_result(world: World) -> DownPrometheus:
    down = DownPrometheus(world.results)
    down.down = False
    world.services.prometheus = down  # type: ignore[assignment]
    world.step()
    world.finish_running()             # the baseline
    world.step()                       # trial 0 starts
    down.down = True
    world.finish("digits-trial-0")     # pushed, but Prometheus is down
    world.step()
    return down


# ---------------------------------------------------------------------------------------- results


def test_a_result_waits_out_a_ten_minute_prometheus_outage_and_is_recorded() -> None:
    world = World(job_body(spec=spec_dict(parallelTrials=1)))
    down = _trial_finished_without_result(world)
    since = world.now
    world.now += 600                   # 10 minutes of outage
    world.step()
    trial = world.history().trials[0]
    assert not trial.done, "nothing is lost while the deadline has not passed"
    status = world.kube.status
    assert status["reason"] == st.WAITING_FOR_RESULTS
    message = status["message"]
    assert "trial-0" in message and _iso(since) in message and "Connection refused" in message
    assert "1800" in message and _iso(since + 1800) in message
    assert world.step().wait >= 2.0, "no tight loop against a Prometheus that is down"
    down.down = False                  # Prometheus is back: the result is recorded as succeeded
    world.step()
    trial = world.history().trials[0]
    assert trial.status == "succeeded"
    assert world.kube.status["reason"] != st.WAITING_FOR_RESULTS


def test_a_result_never_queryable_fails_only_after_the_deadline_even_across_restarts() -> None:
    world = World(job_body(spec=spec_dict(parallelTrials=1)))
    _trial_finished_without_result(world)
    world.now += 1000
    world.restart()                    # a new operator process: its clock starts again, never shorter
    world.step()
    world.now += 1000                  # 2000 s after the pod succeeded, 1000 s after the restart
    world.step()
    assert not world.history().trials[0].done
    world.now += 801
    world.step()
    trial = world.history().trials[0]
    assert trial.status == "failed" and trial.reason == "MetricsUnavailable"
    assert "1800s" in (trial.message or "")


def test_the_results_deadline_is_at_least_ten_minutes() -> None:
    assert OperatorConfig().results_deadline_seconds == 1800
    with pytest.raises(ValueError, match="results_deadline_seconds.*at least 600"):
        _config(results_deadline_seconds=60.0)


def test_the_old_metrics_timeout_setting_is_gone() -> None:
    from qtune.operator.main import build_parser

    args = build_parser().parse_args(["--results-deadline-seconds", "900"])
    assert OperatorConfig.from_args(args).results_deadline_seconds == 900
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--metrics-timeout", "60"])


# ---------------------------------------------------------------------------------------- scheduling


def _pending(world: World, name: str, message: str, since: float) -> None:
    pod = world.kube.pods[name]
    pod["metadata"]["creationTimestamp"] = _iso(since)
    pod["status"] = {"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
        "lastTransitionTime": _iso(since)}]}


SCHEDULER = "0/5 nodes are available: 5 node(s) didn't match Pod's node affinity/selector."


def test_an_unschedulable_pod_puts_the_schedulers_message_in_the_status_and_one_event() -> None:
    world = World()
    world.step()
    _pending(world, BASELINE_POD, SCHEDULER, world.now)
    world.step()
    assert world.kube.status["reason"] == st.REASON_BASELINE   # not yet: the wait is 120 s
    world.now += 121
    world.step()
    world.step()
    status = world.kube.status
    assert status["reason"] == st.UNSCHEDULABLE and SCHEDULER in status["message"]
    assert BASELINE_POD in status["message"]
    assert [r for _, r, _ in world.events].count(st.UNSCHEDULABLE) == 1


def test_a_pod_pending_past_its_time_limit_fails_its_unit_and_the_job_goes_on() -> None:
    world = World(job_body(spec=spec_dict(trialTimeoutSeconds=100, parallelTrials=1, maxTrials=2)))
    world.step()
    world.finish_running()
    world.step()
    _pending(world, "digits-trial-0", SCHEDULER, world.now)
    world.now += 60
    world.step()
    assert not world.history().trials[0].done
    world.now += 40 + 61               # the trial's limit plus the operator's grace
    result = world.step()
    trial = world.history().trials[0]
    assert trial.status == "failed" and trial.reason == "Unschedulable" and SCHEDULER in (trial.message or "")
    assert "digits-trial-0" in world.kube.deleted_pods
    assert result.done or "digits-trial-1" in world.kube.pods, "the job goes on: it does not hang"


# ---------------------------------------------------------------------------------------- lost pods


def _node(ready: str, since: float) -> dict[str, Any]:
    return {"metadata": {"name": "xeon-0"}, "status": {"conditions": [
        {"type": "Ready", "status": ready, "reason": "NodeStatusUnknown",
         "message": "Kubelet stopped posting node status.", "lastTransitionTime": _iso(since)}]}}


def _running_on(world: World, name: str, node: str) -> None:
    world.kube.run_pod(name)
    world.kube.pods[name]["spec"]["nodeName"] = node


def test_a_trial_on_a_node_that_is_not_ready_is_force_deleted_and_started_again() -> None:
    world = World(job_body(spec=spec_dict(parallelTrials=1)))
    world.step()
    world.finish_running()
    world.step()
    _running_on(world, "digits-trial-0", "xeon-0")
    world.kube.nodes["xeon-0"] = _node("True", world.now)
    world.step()
    assert not world.kube.force_deleted
    world.kube.nodes["xeon-0"] = _node("Unknown", world.now)
    world.now += NODE_CACHE_SECONDS + 1  # the operator reads a node at most every NODE_CACHE_SECONDS
    world.step()
    world.now += 60
    world.step()
    assert not world.kube.force_deleted, "NotReady for less than node_lost_seconds (120)"
    world.now += 61
    world.step()
    assert world.kube.force_deleted == ["digits-trial-0"]
    assert "digits-trial-0-a1" in world.kube.pods, "the unit starts again as a new attempt"
    assert ("Warning", "NodeLost") in [(k, r) for k, r, _ in world.events]
    world.finish("digits-trial-0-a1")
    world.step()
    assert world.history().trials[0].status == "succeeded"


def test_a_trial_whose_node_lost_its_container_starts_again_and_fails_no_trial() -> None:
    """A node back from a reboot reports the container it lost as ContainerStatusUnknown (exit 137): the
    trial did nothing wrong, so its unit starts again as a new attempt and no failure is recorded (a
    failure would count towards maxConsecutiveFailures and consume a trial)."""
    world = World(job_body(spec=spec_dict(parallelTrials=1)))
    world.step()
    world.finish_running()
    world.step()
    _running_on(world, "digits-trial-0", "xeon-0")
    world.kube.finish_pod("digits-trial-0", phase="Failed", exitCode=137, reason="ContainerStatusUnknown",
                          message="The container could not be located when the pod was terminated")
    world.step()
    assert world.kube.force_deleted == ["digits-trial-0"]
    assert "digits-trial-0-a1" in world.kube.pods, "the unit starts again as a new attempt"
    assert world.history().trials[0].status == "pending", world.history().trials[0]
    assert any(r == "NodeLost" and "ContainerStatusUnknown" in m for _, r, m in world.events), world.events
    world.finish("digits-trial-0-a1")
    world.step()
    assert world.history().trials[0].status == "succeeded"
    assert len(world.history().trials) == 2, "trial 1 followed; trial 0 was not failed and tried again as 1"


def test_a_trial_that_fails_on_its_own_is_recorded_failed_not_started_again() -> None:
    """The opposite case: an ordinary exit 137 (killed) is the trial's own failure."""
    world = World(job_body(spec=spec_dict(parallelTrials=1)))
    world.step()
    world.finish_running()
    world.step()
    world.kube.finish_pod("digits-trial-0", phase="Failed", exitCode=137, reason="Error")
    world.step()
    assert not world.kube.force_deleted
    assert "digits-trial-0-a1" not in world.kube.pods
    assert world.history().trials[0].status == "failed"


def test_a_baseline_on_a_node_that_is_gone_is_started_again() -> None:
    world = World()
    world.step()
    _running_on(world, BASELINE_POD, "xeon-9")     # no such node
    world.step()
    world.now += 121
    world.step()
    assert world.kube.force_deleted == [BASELINE_POD]
    assert "digits-baseline-a1" in world.kube.pods
    assert world.run_to_end().state == st.SUCCEEDED_STATE


def test_a_pod_stuck_terminating_is_force_deleted() -> None:
    world = World(job_body(spec=spec_dict(parallelTrials=1)))
    world.step()
    world.finish_running()
    world.step()
    _running_on(world, "digits-trial-0", "xeon-0")
    world.kube.nodes["xeon-0"] = _node("True", world.now)
    world.kube.pods["digits-trial-0"]["metadata"]["deletionTimestamp"] = _iso(world.now)
    world.step()
    assert "digits-trial-0-a1" in world.kube.pods, "a pod going away without a result: a new attempt"
    assert not world.kube.force_deleted
    world.now += 61
    world.step()
    assert world.kube.force_deleted == ["digits-trial-0"]


# ---------------------------------------------------------------------------------------- secrets


def test_an_existing_unit_secret_is_never_used() -> None:
    world = World()
    planted = {"kind": "Secret", "metadata": {"name": f"{BASELINE_POD}-key", "namespace": "ml"},
               "stringData": {"secret": "known-to-its-author"}}
    world.kube.objects[("Secret", f"{BASELINE_POD}-key")] = planted
    world.step()
    assert BASELINE_POD not in world.kube.pods
    pod = world.kube.pods["digits-baseline-a1"]
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    ref = env["QTUNE_RESULT_SECRET"]["valueFrom"]["secretKeyRef"]["name"]
    assert ref == "digits-baseline-a1-key"
    assert world.kube.objects[("Secret", ref)]["stringData"]["secret"] != "known-to-its-author"
    assert world.kube.objects[("Secret", f"{BASELINE_POD}-key")] is planted, "not changed, not deleted"
    assert not [n for n in world.kube.configmaps if n.endswith("-input")], "small inputs travel in the pod"
    assert inputs_of(pod, world.kube.configmaps).keys() == {c.JOB_FILE}


def test_a_secret_found_where_a_spare_goes_is_never_used() -> None:
    """The next trial's Secret is written ahead; one of its name that exists already (anyone's) is not taken for
    it: the trial starts under the next attempt, with a Secret the operator created."""
    world = World(job_body(spec=spec_dict(parallelTrials=1)))
    planted = {"kind": "Secret", "metadata": {"name": "digits-trial-1-key", "namespace": "ml"},
               "stringData": {"secret": "known-to-its-author"}}
    world.kube.objects[("Secret", "digits-trial-1-key")] = planted
    world.step()
    world.finish_running()             # the baseline
    world.step()                       # trial 0 starts; trial 1's spare Secret exists already
    world.finish_running()
    world.step()                       # trial 1 starts
    assert "digits-trial-1" not in world.kube.created_pods
    pod = world.kube.pods[c.unit_pod("digits", "trial-1", 1)]
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    ref = env["QTUNE_RESULT_SECRET"]["valueFrom"]["secretKeyRef"]["name"]
    assert ref == c.unit_key(c.unit_pod("digits", "trial-1", 1))
    assert world.kube.objects[("Secret", ref)]["stringData"]["secret"] != "known-to-its-author"
    assert world.kube.objects[("Secret", "digits-trial-1-key")] is planted, "not changed, not deleted"


def test_unit_secrets_that_keep_existing_fail_the_job_naming_the_object() -> None:
    world = World()
    for name in (BASELINE_POD, "digits-baseline-a1", "digits-baseline-a2"):
        world.kube.objects[("Secret", f"{name}-key")] = {"kind": "Secret", "metadata": {"name": f"{name}-key"}}
    result = world.step()
    assert result.done and world.kube.status["reason"] == st.OBJECT_CONFLICT
    assert "Secret ml/digits-baseline-a2-key" in world.kube.status["message"]
    assert not world.kube.pods


# ---------------------------------------------------------------------------------------- poller


class FlakyPrometheus:
    def __init__(self) -> None:
        self.calls = 0

    async def results_of(self, uids: Any) -> dict[str, Any]:
        self.calls += 1
        if self.calls == 1:
            raise KeyError("an unexpected bug")
        if self.calls == 2:
            raise MetricsError("Prometheus query failed: connection refused")
        return {UID: {}}


def test_the_results_poller_survives_any_exception(caplog: pytest.LogCaptureFixture) -> None:
    from qtune.operator.metrics import OperatorMetrics

    metrics = OperatorMetrics()
    prometheus = FlakyPrometheus()
    poller = ResultsPoller(prometheus, 0.0, {UID: asyncio.Event()}, metrics.errors)  # type: ignore[arg-type]
    poller.watch(UID, True)

    async def run() -> None:
        task = asyncio.create_task(poller.run())
        while prometheus.calls < 4:
            await asyncio.sleep(0.01)
        assert not task.done()
        task.cancel()

    import qtune.operator.prom as prom

    sleep = asyncio.sleep
    prom.asyncio.sleep = lambda s: sleep(0)  # type: ignore[assignment]
    try:
        with caplog.at_level(logging.WARNING, logger="qtune.operator.prom"):
            asyncio.run(run())
    finally:
        prom.asyncio.sleep = sleep  # type: ignore[assignment]
    assert prometheus.calls >= 4 and poller.snapshot == {UID: {}} and poller.last_error is None
    assert metrics.registry.get_sample_value("qtune_operator_step_errors_total", {"kind": "poller_KeyError"}) == 1
    assert metrics.registry.get_sample_value("qtune_operator_step_errors_total", {"kind": "prometheus"}) == 1
    bug = [r for r in caplog.records if r.exc_info]
    assert bug and "KeyError" in caplog.text, "logged with its traceback"


def test_a_poller_task_that_ends_is_started_again() -> None:
    from qtune.operator import main
    from qtune.operator.metrics import OperatorMetrics

    class Dying:
        runs = 0

        async def run(self) -> None:
            Dying.runs += 1
            if Dying.runs == 1:
                raise RuntimeError("ended")
            await asyncio.sleep(3600)

    memo: Any = type("Memo", (), {})()
    memo.metrics, memo.poller_restarts = OperatorMetrics(), 0

    async def body() -> None:
        main.start_poller(memo, Dying())
        for _ in range(50):
            await asyncio.sleep(0.01)
        assert Dying.runs == 2 and not memo.poller_task.done()
        assert main._poller_probe(memo)["restarts"] == 1
        memo.stopping = True
        memo.poller_task.cancel()

    asyncio.run(body())
    assert memo.metrics.registry.get_sample_value("qtune_operator_step_errors_total", {"kind": "poller_ended"}) == 1


# ---------------------------------------------------------------------------------------- deletion


def test_only_pods_owned_by_the_job_are_deleted() -> None:
    from qtune.operator.handlers import owned_pods

    def pod(name: str, owner: str | None, namespace: str = "ml") -> dict[str, Any]:
        refs = [{"uid": owner, "kind": "QuantizationJob"}] if owner else []
        return {"metadata": {"name": name, "namespace": namespace, "ownerReferences": refs,
                             "labels": {"qtune.io/job-uid": UID}}}

    pods = [pod("mine", UID), pod("labelled-only", None), pod("someone-elses", "other-uid"),
            pod("elsewhere", UID, namespace="other")]
    assert owned_pods(pods, "ml", UID) == ["mine"]


def test_jobs_have_no_finalizer() -> None:
    import kopf

    from qtune.operator import handlers  # noqa: F401  (registers)

    registry = kopf.get_default_registry()
    assert not any(h.requires_finalizer for h in registry._spawning.get_all_handlers())
    assert not any(h.requires_finalizer for h in registry._changing.get_all_handlers())


class FakeGateway:
    def __init__(self, groups: list[dict[str, str]]) -> None:
        self.groups_ = groups
        self.deleted: list[tuple[str, str]] = []

    async def groups(self) -> list[dict[str, str]]:
        return list(self.groups_)

    async def delete_labels(self, labels: dict[str, str]) -> bool:
        self.deleted.append((labels["job_uid"], labels["unit"]))
        return labels.get("x") != "404"


GROUPS = [{"job": PUSH_JOB, "job_uid": "live", "unit": "trial-0"},
          {"job": PUSH_JOB, "job_uid": "gone", "unit": "trial-0"},
          {"job": PUSH_JOB, "job_uid": "gone", "unit": "baseline"},
          {"job": "someone-else", "job_uid": "gone", "unit": "x"}]


def test_the_sweep_deletes_only_qtune_groups_of_jobs_that_do_not_exist() -> None:
    assert orphan_groups(GROUPS, {"live"}, set()) == GROUPS[1:3]
    assert orphan_groups(GROUPS, None, set()) == [], "without the list of jobs: only jobs seen deleted"
    assert orphan_groups(GROUPS, None, {"gone"}) == GROUPS[1:3]
    gateway = FakeGateway(GROUPS)

    async def live() -> set[str]:
        return {"live"}

    sweeper = GroupSweeper(gateway, live, 1.0, set())  # type: ignore[arg-type]
    assert asyncio.run(sweeper.sweep_once()) == 2
    assert gateway.deleted == [("gone", "trial-0"), ("gone", "baseline")]


def test_the_sweep_without_rights_to_list_jobs_sweeps_only_jobs_seen_deleted() -> None:
    from kubernetes.client import ApiException

    gateway = FakeGateway(GROUPS)

    async def forbidden() -> set[str]:
        raise ApiException(status=403, reason="Forbidden")

    sweeper = GroupSweeper(gateway, forbidden, 1.0, {"gone"})  # type: ignore[arg-type]
    assert asyncio.run(sweeper.sweep_once()) == 2
    assert ("live", "trial-0") not in gateway.deleted


def test_the_sweep_deletes_groups_pushed_with_extra_labels_and_counts_only_what_it_deleted() -> None:
    poison = {"job": PUSH_JOB, "job_uid": "gone", "unit": "trial-0", "x": "1"}
    missing = {"job": PUSH_JOB, "job_uid": "gone", "unit": "trial-1", "x": "404"}
    assert orphan_groups([poison, missing], {"live"}, set()) == [poison, missing]
    gateway = FakeGateway([*GROUPS, poison, missing])

    async def live() -> set[str]:
        return {"live"}

    sweeper = GroupSweeper(gateway, live, 1.0, set())  # type: ignore[arg-type]
    assert asyncio.run(sweeper.sweep_once()) == 3, "the 404 is not counted as swept"
    assert ("gone", "trial-0") in gateway.deleted and sweeper.swept == 3


# ---------------------------------------------------------------------------------------- pod index lag


def test_a_pod_the_index_does_not_show_yet_is_not_started_again() -> None:
    """Under load the pod index (a watch) lags the operator's own creates: a step that does not see the
    pod it just created must not start the unit again under a new attempt (seen in the 100-job scale run:
    10 of 1,000 trials got a second pod, and the first pod's result would have been rejected)."""
    world = World(job_body(spec=spec_dict(parallelTrials=1)))
    world.step()
    world.finish_running()             # the baseline
    world.step()                       # trial 0 starts
    created = set(world.kube.pods)
    assert "digits-trial-0" in created

    def step_blind() -> None:          # a step whose pod index lacks the new trial pod
        world.now += 1.0
        seen = [p for p in world.pods() if p.name != "digits-trial-0"]
        asyncio.run(world.reconciler.step(world.body, seen))

    for _ in range(10):
        step_blind()
    assert set(world.kube.pods) == created, "no second pod for trial 0 while its first is not yet seen"
    world.now += 120                   # never seen for longer than the expectation: the unit starts again
    step_blind()
    assert "digits-trial-0-a1" in world.kube.pods


def test_jobs_waiting_on_the_same_node_share_one_read() -> None:
    """Many jobs' steps asking for one node at once make one API request (the scale run made 8 node reads
    per trial when every job's expired cache entry sent its own)."""
    world = World()
    reads: list[str] = []

    async def slow_read(name: str) -> dict[str, Any] | None:
        reads.append(name)
        await asyncio.sleep(0.05)
        return {"metadata": {"name": name}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}

    world.kube.read_node = slow_read  # type: ignore[method-assign]
    reconcilers = [world.reconciler] * 20

    async def together() -> list[Any]:
        return await asyncio.gather(*(r.executor.nodes.read("xeon-0", world.now) for r in reconcilers))

    nodes = asyncio.run(together())
    assert reads == ["xeon-0"] and all(n["metadata"]["name"] == "xeon-0" for n in nodes)
    asyncio.run(world.reconciler.executor.nodes.read("xeon-0", world.now + 1))
    assert reads == ["xeon-0"], "a fresh entry is served from the cache"


def _slow_writes(world: World, log: list[tuple[str, str, float]]) -> None:
    """Every write of the fake API takes 50 ms, logged as (what, start|end, the event loop's time)."""

    def slowed(name: str, what: Any) -> Any:
        async def call(*args: Any, **kwargs: Any) -> Any:
            body = args[0] if args and isinstance(args[0], dict) else {}
            label = f"{name}:{body.get('kind', '')}:{(body.get('metadata') or {}).get('name', '')}"
            log.append((label, "start", asyncio.get_running_loop().time()))
            await asyncio.sleep(0.05)
            try:
                return await what(*args, **kwargs)
            finally:
                log.append((label, "end", asyncio.get_running_loop().time()))
        return call

    for name in ("create_pod", "ensure", "create_configmap", "replace_configmap"):
        setattr(world.kube, name, slowed(name, getattr(world.kube, name)))


def _secret_attempts(world: World) -> dict[str, int]:
    """unit -> the highest attempt of the job's unit Secrets in the (fake) cluster."""
    out: dict[str, int] = {}
    for (kind, _), body in world.kube.objects.items():
        labels = body["metadata"].get("labels") or {}
        if kind == "Secret" and c.LABEL_UNIT in labels:
            unit, attempt = labels[c.LABEL_UNIT], int(labels[c.LABEL_ATTEMPT])
            out[unit] = max(out.get(unit, -1), attempt)
    return out


def test_a_dispatch_stores_the_history_and_creates_the_next_pod_at_once() -> None:
    """Issue 20: between a trial's result and the next trial's pod, one round trip: the history (holding the
    finished trial) is stored while the next trial's pod, which carries its inputs, is created. Its Secret was
    written ahead, after the step before had stored its attempt (no unit secret exists whose attempt the stored
    history lacks); this step's history holds the attempt of the trial after it, whose Secret is written after
    the pod."""
    world = World(job_body(spec=spec_dict(parallelTrials=1)))
    world.step()
    world.finish_running()             # the baseline
    world.step()                       # trial 0 starts; trial 1's attempt stored, then its Secret written
    assert world.history().attempts.get("trial-1") == 0
    assert ("Secret", c.unit_key("digits-trial-1")) in world.kube.objects
    world.finish_running()             # trial 0 finishes
    log: list[tuple[str, str, float]] = []

    async def step() -> None:
        _slow_writes(world, log)
        world.now += 1.0
        await world.reconciler.step(world.body, world.pods())

    asyncio.run(step())
    spans = {label: [t for what, edge, t in log if what == label] for label, _, _ in log}
    pod = next(label for label in spans if label.startswith("create_pod:"))
    assert pod.endswith("digits-trial-1"), spans
    started = {label: times[0] for label, times in spans.items()}
    ended = {label: times[1] for label, times in spans.items()}
    before_pod = [label for label in spans if ended[label] <= started[pod]]
    assert before_pod == [], spans
    history = "replace_configmap:ConfigMap:digits-history"
    assert abs(started[history] - started[pod]) < 0.01, "the history and the pod written at once: one round trip"
    assert not [label for label in spans if label.startswith(("ensure:ConfigMap:", "create_configmap:"))], spans
    spare = next(label for label in spans if label.startswith("ensure:Secret:"))
    assert spare.endswith(c.unit_key("digits-trial-2")) and started[spare] >= ended[pod], spans
    assert world.history().attempts.get("trial-2") == 0, "its attempt was stored before its Secret"


def test_secrets_written_ahead_keep_every_attempt_stored_first_across_restarts() -> None:
    """After every step, each unit Secret's attempt is in the stored history; a restarted operator (which cannot
    know whether a Secret it finds is its own) never takes a Secret written ahead: the unit takes a new attempt.
    The Secrets this process wrote ahead that no pod used are deleted once the job finished."""
    world = World(job_body(spec=spec_dict(parallelTrials=1)))
    for turn in range(40):
        result = world.step()
        stored = world.history().attempts
        for unit, attempt in _secret_attempts(world).items():
            assert stored.get(unit, -1) >= attempt, (unit, attempt, stored)
        if result.done:
            break
        if turn == 2:                  # trial 1 runs; trial 2's Secret was written ahead by this process
            world.restart()
        world.finish_running()
    assert result.done, world.kube.status
    # the earlier process's spare (trial 2, attempt 0) goes with the job: a Secret this process did not create is
    # never deleted by name; every other one is gone
    left = [k for k in world.kube.objects if k[0] == "Secret"]
    assert left == [("Secret", c.unit_key(c.unit_pod("digits", "trial-2", 0)))], left
    created = world.kube.created_pods
    assert len(set(created)) == len(created)
    trials = world.history().trials
    again = [t.index for t in trials if c.unit_pod("digits", f"trial-{t.index}", 1) in created]
    assert len(again) == 1, f"the trial after the restart takes attempt 1, not the spare's Secret: {created}"
    assert len(trials) == len({t.index for t in trials}) and all(t.done for t in trials)


def test_a_history_that_cannot_be_stored_starts_no_pod() -> None:
    world = World(job_body(spec=spec_dict(parallelTrials=1)))
    world.step()
    world.finish_running()             # the baseline
    world.step()                       # trial 0 starts
    world.finish_running()             # trial 0 finishes
    before = set(world.kube.pods)
    real_replace = world.kube.replace_configmap

    async def refused(body: dict[str, Any]) -> dict[str, Any]:
        if body["metadata"]["name"] == "digits-history":
            raise ApiException(status=500, reason="etcd timeout")
        return await real_replace(body)

    world.kube.replace_configmap = refused  # type: ignore[method-assign]
    with pytest.raises(ApiException):
        world.step()
    # the pod, created while the history was being stored, is deleted again, and so is its Secret (written ahead)
    assert "digits-trial-1" in world.kube.created_pods
    assert set(world.kube.pods) == before, "no pod for a trial whose predecessor's result is not stored"
    assert not [key for key in world.kube.objects if key[0] == "Secret" and "trial-1" in key[1]], world.kube.objects
    assert c.unit_inputs("digits-trial-1") not in world.kube.configmaps, "the inputs no pod will read are gone"
    assert ("Secret", c.unit_key("digits-trial-1")) not in world.kube.objects
    world.kube.replace_configmap = real_replace  # type: ignore[method-assign]
    world.step()
    started = set(world.kube.pods) - before
    assert len(started) == 1 and started.pop().startswith("digits-trial-1"), world.kube.pods.keys()
    assert [t.index for t in world.history().trials] == [0, 1] and world.history().trials[0].status == "succeeded"


def test_a_pod_whose_history_was_never_stored_runs_its_trial_again_after_a_crash() -> None:
    """The window of a one-round-trip dispatch: the operator dies after creating the next trial's pod and before
    its history is stored. The restarted operator records the trial before from its result, lets the orphan pod
    finish, ignores its result (the stored history has no record of its trial) and runs the trial again under a
    new attempt: every trial is recorded once."""
    world = World(job_body(spec=spec_dict(parallelTrials=1)))
    world.step()
    world.finish_running()             # the baseline
    world.step()                       # trial 0 starts
    world.finish_running()             # trial 0 finishes
    real = world.kube.replace_configmap, world.kube.delete_pod, world.kube.delete
    real_replace = real[0]

    async def killed(body: dict[str, Any]) -> dict[str, Any]:
        if body["metadata"]["name"] == "digits-history":
            raise RuntimeError("the operator was killed")
        return await real_replace(body)

    async def dead(*_: Any, **__: Any) -> bool:  # a killed process deletes nothing
        return False

    world.kube.replace_configmap, world.kube.delete_pod, world.kube.delete = killed, dead, dead  # type: ignore
    with pytest.raises(RuntimeError):
        world.step()
    assert "digits-trial-1" in world.kube.pods and [t.index for t in world.history().trials] == [0]
    world.kube.replace_configmap, world.kube.delete_pod, world.kube.delete = real  # type: ignore[method-assign]
    world.restart()
    for _ in range(60):
        if world.step().done:
            break
        world.finish_running()
    assert world.kube.status.get("state") == st.SUCCEEDED_STATE, world.kube.status
    trials = world.history().trials
    assert [t.index for t in trials] == list(range(len(trials))) and all(t.done for t in trials)
    assert trials[0].status == "succeeded"
    assert c.unit_pod("digits", "trial-1", 1) in world.kube.created_pods, "trial 1 ran again under a new attempt"


def test_a_step_that_changes_nothing_does_not_build_the_status_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """With many jobs, most steps change nothing (a periodic check): building the status (every recent trial's
    config parsed) each time cost the operator its CPU at scale. It is built again when the history changes."""
    built: list[str] = []
    real_build = st.build_status

    def counting(**kwargs: Any) -> Any:
        built.append(kwargs["state"])
        return real_build(**kwargs)

    monkeypatch.setattr(st, "build_status", counting)
    described: list[int] = []
    real_describe = StatusWriter._describe_progress

    def describing(self: StatusWriter, session: Any) -> str:
        described.append(len(session.history.trials))
        return real_describe(self, session)

    monkeypatch.setattr(StatusWriter, "_describe_progress", describing)
    world = World(job_body(spec=spec_dict(parallelTrials=1)))
    world.step()
    world.finish_running()             # the baseline
    world.step()                       # trial 0 starts
    built.clear()
    described.clear()
    for _ in range(5):
        world.step()
    assert built == [] and described == [], "nothing changed: neither the status nor its message is made again"
    world.finish_running()             # trial 0 finishes
    world.step()
    assert built, "a recorded trial changes the status"
    recent = world.kube.status.get("recentTrials") or []
    assert [t["index"] for t in recent if t["status"] == "succeeded"] == [0], world.kube.status
