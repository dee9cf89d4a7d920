"""spec.trial.queueName (issue 21, docs/kueue.md): unit pods carry Kueue's queue-name label, nothing changes
without it; a pod Kueue has not admitted yet is neither unschedulable nor running late."""

from __future__ import annotations

import copy
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes.client import ApiException
from opfakes import job_body

from qtune.operator import builders, crd, podstatus
from qtune.operator import constants as c
from qtune.operator import status as st
from qtune.operator.config import OperatorConfig
from qtune.operator.layout import JobRef
from qtune.operator.observe import Limits, Observation, _overdue, queued_status
from qtune.operator.queueing import REFRESH_SECONDS, pending_messages
from qtune.operator.reconcile import validate
from qtune.spec.errors import SpecError
from qtune.spec.load import job_from_dict

CONFIG = {"approach": "static", "format": "QDQ", "calibration_sampling_size": 100, "ops": {}, "extras": {}}
T0 = 1_700_000_000.0


def _body(queue: str | None) -> dict:
    body = job_body()
    if queue is not None:
        body["spec"]["trial"]["queueName"] = queue
    return body


def _pod(body: dict, config: OperatorConfig | None = None) -> dict:
    spec, _ = validate(body)
    plan = builders.UnitPlan(unit="trial-3", attempt=0, trial=3, tune_config=CONFIG)
    return builders.unit_pod(JobRef.from_body(body), spec, plan, config or OperatorConfig(pushgateway_url="http://pgw:9091"))


def test_unit_pods_carry_the_queue_label() -> None:
    pod = _pod(_body("team-a"))
    assert pod["metadata"]["labels"][c.KUEUE_QUEUE_LABEL] == "team-a"
    assert c.KUEUE_QUEUE_LABEL == "kueue.x-k8s.io/queue-name"


def test_without_a_queue_the_pod_is_unchanged() -> None:
    plain = _pod(_body(None))
    assert c.KUEUE_QUEUE_LABEL not in plain["metadata"]["labels"]
    queued = _pod(_body("team-a"))
    del queued["metadata"]["labels"][c.KUEUE_QUEUE_LABEL]
    assert queued == plain


def test_the_operators_default_queue_applies_when_the_job_names_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QTUNE_TRIAL_QUEUE_NAME", "shared")
    config = OperatorConfig.from_env()
    assert config.trial_queue_name == "shared"
    assert _pod(_body(None), config)["metadata"]["labels"][c.KUEUE_QUEUE_LABEL] == "shared"
    assert _pod(_body("team-a"), config)["metadata"]["labels"][c.KUEUE_QUEUE_LABEL] == "team-a", "the job's wins"
    monkeypatch.setenv("QTUNE_TRIAL_QUEUE_NAME", "Not_A_Label")
    with pytest.raises(ValueError, match="LocalQueue"):
        OperatorConfig.from_env()


@pytest.mark.parametrize("name", ["Team", "-a", "a-", "a_b", "x" * 64, ""])
def test_queue_names_that_are_no_label_value_are_refused(name: str) -> None:
    spec = copy.deepcopy(_body(name)["spec"])
    with pytest.raises((SpecError, ValueError)):
        job_from_dict({"apiVersion": c.API_VERSION, "kind": c.KIND, "metadata": {"name": "j"}, "spec": spec})


def test_the_crd_has_the_field_with_the_same_rule() -> None:
    field = crd.spec_schema()["properties"]["trial"]["properties"]["queueName"]
    assert field["type"] == "string" and field["maxLength"] == 63 and field["pattern"].startswith("^[a-z0-9]")


def _status(gated: bool, scheduled: float | None = None, queue: str | None = "team-a") -> dict:
    conditions = []
    if gated:
        conditions.append({"type": "PodScheduled", "status": "False", "reason": "SchedulingGated",
                           "message": "Scheduling is blocked due to non-empty scheduling gates",
                           "lastTransitionTime": "2023-11-14T22:13:20Z"})
    elif scheduled is not None:
        conditions.append({"type": "PodScheduled", "status": "True", "lastTransitionTime": scheduled})
    return {
        "metadata": {"name": "digits-trial-3", "namespace": "ml", "creationTimestamp": "2023-11-14T22:13:20Z",
                     "labels": {c.LABEL_UNIT: "trial-3", **({c.KUEUE_QUEUE_LABEL: queue} if queue else {})}},
        "spec": {"schedulingGates": [{"name": c.KUEUE_ADMISSION_GATE}] if gated else []},
        "status": {"phase": "Pending", "conditions": conditions},
    }


def test_a_gated_pod_is_queued_not_unschedulable() -> None:
    pod = podstatus.summarize_pod(_status(gated=True))
    assert pod.queued and pod.queue == "team-a" and pod.unschedulable is None


def test_a_queued_pod_is_never_overdue_and_an_admitted_one_counts_from_scheduling() -> None:
    limits = Limits(trial_timeout=100.0, grace=10.0)
    late = T0 + 10_000  # far past creation + any unit's time limit
    assert _overdue("trial-3", podstatus.summarize_pod(_status(gated=True)), late, limits) is None
    admitted = podstatus.summarize_pod(_status(gated=False, scheduled="2023-11-15T00:59:00Z"))
    assert admitted.scheduled_at is not None
    assert _overdue("trial-3", admitted, admitted.scheduled_at + 5, limits) is None
    assert _overdue("trial-3", admitted, admitted.scheduled_at + 10_000, limits)[0] == "Timeout"


def test_without_a_queue_a_pending_pod_is_still_timed_from_its_creation() -> None:
    pod = podstatus.summarize_pod(_status(gated=False, queue=None))
    assert _overdue("trial-3", pod, T0 + 10_000, Limits(trial_timeout=100.0, grace=10.0))[0] == "Timeout"


# ---------------------------------------------------------------------------------------- the job's status


def _queued_world(**tuning: Any) -> Any:
    from test_reconcile import World, spec_dict

    spec = spec_dict(**tuning)
    spec["trial"]["queueName"] = "team-a"
    return World(job_body(spec=spec))


def _gate(world: Any, name: str, since: float) -> None:
    pod = world.kube.pods[name]
    assert pod["metadata"]["labels"][c.KUEUE_QUEUE_LABEL] == "team-a"
    pod["metadata"]["creationTimestamp"] = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    pod["spec"]["schedulingGates"] = [{"name": c.KUEUE_ADMISSION_GATE}]
    pod["status"] = {"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "SchedulingGated",
        "message": "Scheduling is blocked due to non-empty scheduling gates",
        "lastTransitionTime": pod["metadata"]["creationTimestamp"]}]}


def test_a_job_whose_units_all_wait_for_kueue_is_queued_and_says_where_and_how_long() -> None:
    from test_reconcile import BASELINE_POD

    world = _queued_world(trialTimeoutSeconds=100)
    world.step()
    _gate(world, BASELINE_POD, world.now)
    world.now += 3600  # an hour in the queue: far past the unit's time limit plus grace
    world.step()
    status = world.kube.status
    assert status["reason"] == st.QUEUED, status
    assert f"pod {BASELINE_POD} (baseline) waits for Kueue's admission in LocalQueue team-a for 360" \
        in status["message"]
    assert status["state"] not in ("Failed", "Succeeded") and BASELINE_POD not in world.kube.deleted_pods
    assert not [r for _, r, _ in world.events if r == st.UNSCHEDULABLE]


def test_a_running_unit_keeps_the_reason_and_a_queued_one_is_named_in_the_message() -> None:
    seen = Observation(running={"trial-0", "trial-1"})
    seen.queued["trial-1"] = podstatus.summarize_pod(_status(gated=True))
    reason, message = queued_status(seen, st.REASON_TUNING, "1/8 trials finished", T0 + 30)
    assert reason == st.REASON_TUNING and "waits for Kueue's admission in LocalQueue team-a" in message
    assert queued_status(Observation(running={"trial-0"}), "R", "M", T0) == ("R", "M")


KUEUE_SAYS = ("couldn't assign flavors to pod set main: insufficient unused quota for cpu in flavor default, "
              "2 more needed")


def _workload(pod: dict, message: str) -> dict:
    return {"metadata": {"name": "pod-x-1", "ownerReferences": [{"kind": "Pod", "uid": pod["metadata"]["uid"]}]},
            "status": {"conditions": [{"type": "QuotaReserved", "status": "False", "reason": "Pending",
                                       "message": message}]}}


def test_the_status_carries_kueues_reason_read_at_most_every_few_seconds() -> None:
    from test_reconcile import BASELINE_POD

    world = _queued_world()
    world.step()
    _gate(world, BASELINE_POD, world.now)
    world.kube.pods[BASELINE_POD]["metadata"].setdefault("uid", "pod-uid-1")
    world.kube.workloads = [_workload(world.kube.pods[BASELINE_POD], KUEUE_SAYS)]
    world.step()
    assert world.kube.status["reason"] == st.QUEUED
    assert re.search(r"in LocalQueue team-a for [01]s: " + re.escape(KUEUE_SAYS) + "$", world.kube.status["message"])
    lists = world.kube.custom_lists
    world.step()
    world.step()
    assert world.kube.custom_lists == lists, "not listed again within REFRESH_SECONDS"
    world.now += REFRESH_SECONDS + 1
    world.step()
    assert world.kube.custom_lists == lists + 1


def test_without_kueues_api_the_status_names_the_queue_and_the_api_is_not_asked_again() -> None:
    from test_reconcile import BASELINE_POD

    world = _queued_world()
    world.step()
    _gate(world, BASELINE_POD, world.now)
    world.step()  # workloads None: 404
    assert world.kube.status["reason"] == st.QUEUED and "kubectl get workloads" in world.kube.status["message"]
    world.now += 60
    world.step()
    assert world.kube.custom_lists == 1


def test_a_job_without_queued_units_never_lists_workloads() -> None:
    from test_reconcile import World

    world = World()
    world.kube.workloads = []
    for _ in range(3):
        world.step()
    assert world.kube.custom_lists == 0


def test_pending_messages_map_pod_uids_to_kueues_message() -> None:
    admitted = {"metadata": {"ownerReferences": [{"kind": "Pod", "uid": "b"}]},
                "status": {"conditions": [{"type": "QuotaReserved", "status": "True", "message": "admitted"}]}}
    assert pending_messages([_workload({"metadata": {"uid": "a"}}, KUEUE_SAYS), admitted, {}]) == {"a": KUEUE_SAYS}


def test_a_failing_workload_list_keeps_the_job_going_and_is_tried_again() -> None:
    from test_reconcile import BASELINE_POD

    world = _queued_world()
    world.step()
    _gate(world, BASELINE_POD, world.now)

    async def broken(*_: Any) -> dict:
        world.kube.custom_lists += 1
        raise ApiException(status=500, reason="Internal Server Error")

    world.kube.list_custom = broken
    world.step()
    assert world.kube.status["reason"] == st.QUEUED
    world.now += REFRESH_SECONDS + 1
    world.step()
    assert world.kube.custom_lists == 2, "a 500 does not switch the reasons off"


STOP_REASON = "WorkloadEvictedDueToPreempted"  # what Kueue v0.17 writes (seen on the plane)
PREEMPTED = ("Preempted to accommodate a workload (UID: w-1, JobUID: j-1) due to prioritization in the "
             "ClusterQueue")


def _kueue_stops(world: Any, name: str) -> None:
    """What Kueue does to a pod it preempts: the TerminationTarget condition, then the delete (the pod terminates)."""
    pod = world.kube.pods[name]
    pod["metadata"]["deletionTimestamp"] = "2099-01-01T00:00:30Z"
    pod["status"] = {"phase": "Running", "startTime": "2099-01-01T00:00:00Z", "conditions": [{
        "type": c.KUEUE_TERMINATION_TARGET, "status": "True", "reason": STOP_REASON, "message": PREEMPTED,
        "lastTransitionTime": "2099-01-01T00:00:29Z"}]}


def _a_trial_running() -> tuple[Any, str]:
    """A queued job of 3 trials, one at a time, past its baseline: the world and its running trial's pod."""
    world = _queued_world(maxTrials=3, parallelTrials=1)
    world.step()
    world.finish_running()  # the baseline
    world.step()
    (trial_pod,) = world.running_pods()
    return world, trial_pod


def test_a_unit_kueue_preempts_is_named_in_the_status_and_an_event_and_is_no_failure() -> None:
    world, trial_pod = _a_trial_running()
    _kueue_stops(world, trial_pod)
    world.step()
    message = world.kube.status["message"]
    assert (f"Kueue preempted or evicted 1 unit pod (not failures: it runs again), the latest {trial_pod} "
            f"(trial-0): WorkloadEvictedDueToPreempted: {PREEMPTED}") in message, message
    del world.kube.pods[trial_pod]  # gone: the unit starts again as its next attempt
    world.step()
    assert f"{trial_pod}-a1" in world.kube.pods
    assert "Kueue preempted or evicted 1 unit pod" in world.kube.status["message"]
    assert world.run_to_end().done  # (no trial of 3 passes this simulated model: the outcome is beside the point)
    preempted = [(kind, message) for kind, reason, message in world.events if reason == "UnitPreempted"]
    assert preempted == [("Normal", f"pod {trial_pod} (trial-0) was stopped by Kueue (WorkloadEvictedDueToPreempted: "
                                    f"{PREEMPTED}); not a failure: the unit runs again")]
    history = world.history()
    assert sorted(t.index for t in history.trials) == [0, 1, 2] and all(t.status == "succeeded" for t in history.trials)
    trials = world.kube.status["trials"]
    assert (trials["started"], trials["succeeded"], trials["failed"]) == (3, 3, 0)


def test_the_stops_survive_an_operator_restart_and_are_named_once() -> None:
    """The count of stops and the one Event per stop live in the (signed) history: a restarted operator that sees
    the same stopped pod again neither names it a second time nor forgets it in the status."""
    world, trial_pod = _a_trial_running()
    _kueue_stops(world, trial_pod)
    world.step()
    stopped = copy.deepcopy(world.kube.pods[trial_pod])
    del world.kube.pods[trial_pod]
    world.step()  # trial-0 starts again as -a1: the history is stored with its attempt, and with the stop
    assert list(world.history().queue_stops) == [trial_pod]
    world.restart()
    world.kube.pods[trial_pod] = stopped  # the deleted pod is still seen once by the new process
    world.step()
    assert "Kueue preempted or evicted 1 unit pod" in world.kube.status["message"], world.kube.status["message"]
    assert [r for _, r, _ in world.events].count("UnitPreempted") == 1
    del world.kube.pods[trial_pod]
    assert world.run_to_end().done
    assert list(world.history().queue_stops) == [trial_pod]
    assert world.history().queue_stops[trial_pod].unit == "trial-0"


def test_a_pod_kueue_stops_carries_kueues_reason_and_others_none() -> None:
    body = _status(gated=False)
    assert podstatus.summarize_pod(body).kueue_stopped is None
    body["status"]["conditions"] = [{"type": c.KUEUE_TERMINATION_TARGET, "status": "True",
                                     "reason": "WorkloadEvictedDueToPreempted", "message": PREEMPTED}]
    assert podstatus.summarize_pod(body).kueue_stopped == f"WorkloadEvictedDueToPreempted: {PREEMPTED}"


def test_a_pod_kueue_deletes_before_the_jobs_loop_sees_it_is_still_named() -> None:
    """Kueue deletes a pod it stops at once, and Kopf's index never holds a deleted pod: the event handler keeps
    it (DELETED events included) for the job's loop, which names it; a pod the job does not own is ignored."""
    import asyncio

    import kopf

    from qtune.operator.handlers import _kueue_stopped, kueue_stopped_pod

    world, trial_pod = _a_trial_running()
    _kueue_stops(world, trial_pod)
    body = copy.deepcopy(world.kube.pods[trial_pod])
    del world.kube.pods[trial_pod]  # gone before the next step
    assert _kueue_stopped(body=body) and not _kueue_stopped(body={"status": {"phase": "Running"}})
    memo = kopf.Memo(wakeups={})
    asyncio.run(kueue_stopped_pod(body=body, memo=memo))
    stranger = podstatus.summarize_pod({**body, "metadata": {**body["metadata"], "name": "other",
                                                             "ownerReferences": []}})
    kept = list(memo.kueue_stopped[world.reconciler.job.uid].values())
    world.reconciler.kueue_stops.note([*kept, stranger])
    world.step()
    assert f"the latest {trial_pod} (trial-0): {STOP_REASON}: {PREEMPTED}" in world.kube.status["message"]
    assert [m for _, r, m in world.events if r == "UnitPreempted"] == [
        f"pod {trial_pod} (trial-0) was stopped by Kueue ({STOP_REASON}: {PREEMPTED}); not a failure: the unit "
        "runs again"]
