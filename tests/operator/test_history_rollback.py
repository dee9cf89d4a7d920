"""An earlier history the operator itself signed, put back, is refused also across a restart (issue 20).

Each store raises the signed `History.sequence` and the job's status records it (`status.history.sequence`: the
status subresource, which tenants are not granted); a stored history older than the status's fails the job
HistoryRejected. The normal resume, jobs whose status records no sequence yet, and a peer taking over still work.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from opfakes import SIGNING_KEY, job_body
from test_reconcile import World, spec_dict

from qtune.operator import constants as c
from qtune.operator import status as st
from qtune.operator.config import OperatorConfig
from qtune.operator.layout import JobRef
from qtune.operator.reconcile import JobReconciler
from qtune.operator.store import recorded_sequence, sign_history

CONFIG = OperatorConfig(prometheus_url="http://prom:9090", pushgateway_url="http://pgw:9091",
                        trial_image="qtune:test", signing_key=SIGNING_KEY)
HISTORY = c.history_configmap("digits")


def _world() -> World:
    return World(job_body(spec=spec_dict(parallelTrials=1)), config=CONFIG)


def _advance(world: World, steps: int) -> None:
    for _ in range(steps):
        world.finish_running()
        assert not world.step().done, world.kube.status


def _stored(world: World) -> dict[str, Any]:
    return copy.deepcopy(world.kube.configmaps[HISTORY])


def _put_back(world: World, earlier: dict[str, Any]) -> None:
    """What a tenant who may edit ConfigMaps does: replace the history with a copy it saved earlier."""
    earlier = copy.deepcopy(earlier)
    earlier["metadata"]["resourceVersion"] = world.kube.configmaps[HISTORY]["metadata"]["resourceVersion"] + "-back"
    world.kube.configmaps[HISTORY] = earlier


def test_the_status_records_the_sequence_of_the_stored_history() -> None:
    world = _world()
    seen = []
    for _ in range(5):
        world.finish_running()
        world.step()
        stored = world.history().sequence
        assert stored > 0 and recorded_sequence(world.kube.status) == stored
        seen.append(stored)
    assert seen == sorted(seen) and seen[-1] > seen[0]


def test_an_earlier_signed_history_put_back_while_the_operator_is_down_is_refused() -> None:
    world = _world()
    _advance(world, 2)
    earlier = _stored(world)
    _advance(world, 3)
    assert len(world.history().trials) > len(json.loads(earlier["data"][c.HISTORY_KEY])["trials"])
    _put_back(world, earlier)  # the operator is stopped meanwhile: the signature verifies
    world.restart()
    assert world.step().done and world.kube.status["state"] == st.FAILED_STATE
    assert world.kube.status["reason"] == "HistoryRejected"
    message = world.kube.status["message"]
    assert "ConfigMap ml/digits-history" in message and "older than the job's status" in message, message


def test_a_restarted_operator_resumes_from_the_latest_history() -> None:
    world = _world()
    _advance(world, 3)
    world.restart()
    _advance(world, 1)
    world.restart()
    assert world.run_to_end().done and world.kube.status["state"] == st.SUCCEEDED_STATE, world.kube.status
    assert recorded_sequence(world.kube.status) == world.history().sequence


def test_a_history_stored_just_before_a_stop_is_accepted_although_the_status_lags() -> None:
    """The operator stopped between a history write and the status write that follows it: the stored history is
    newer than the status's, which is the normal resume."""
    world = _world()
    _advance(world, 3)
    world.kube.status["history"]["sequence"] -= 1
    world.restart()
    _advance(world, 1)
    assert recorded_sequence(world.kube.status) == world.history().sequence
    assert world.run_to_end().done and world.kube.status["state"] == st.SUCCEEDED_STATE


def test_a_job_started_before_the_sequence_is_accepted_and_recorded() -> None:
    """No sequence in the status nor in the (signed) history: accepted; recorded from the next store."""
    world = _world()
    _advance(world, 3)
    body = world.kube.configmaps[HISTORY]
    document = json.loads(body["data"][c.HISTORY_KEY])
    document.pop("sequence")
    body["data"][c.HISTORY_KEY] = json.dumps(document)
    sign_history(body, world.reconciler.job, SIGNING_KEY)
    world.kube.status["history"].pop("sequence")
    world.restart()
    _advance(world, 1)
    assert recorded_sequence(world.kube.status) == world.history().sequence == 1
    assert world.run_to_end().done and world.kube.status["state"] == st.SUCCEEDED_STATE


def test_a_peer_takes_over_and_back_and_still_refuses_a_rollback() -> None:
    """Two replicas (Kopf peering: one active at a time) over the same job: the one that resumes holds a history
    older than the status records (its peer stored since): it reads the stored one again, does not refuse it."""
    world = _world()
    _advance(world, 2)
    first = world.reconciler
    earlier = _stored(world)
    world.reconciler = JobReconciler(world.services, JobRef.from_body(world.body), lambda *event: None)
    world.body["status"] = copy.deepcopy(world.kube.status)
    _advance(world, 3)
    world.reconciler = first
    world.body["status"] = copy.deepcopy(world.kube.status)
    _advance(world, 1)
    assert recorded_sequence(world.kube.status) == world.history().sequence
    _put_back(world, earlier)
    world.body["status"] = copy.deepcopy(world.kube.status)
    for _ in range(4):
        world.finish_running()
        if world.step().done:
            break
    assert world.kube.status["reason"] == "HistoryRejected", world.kube.status


def test_a_status_written_without_the_history_keeps_the_recorded_sequence() -> None:
    """A status published while the history is not loaded (after an API refusal, a conflict) does not erase
    status.history: the recorded sequence would drop to none and any earlier history be accepted."""
    old = {"history": {"configMap": HISTORY, "trials": 4, "sequence": 9}}
    status = st.build_status(state=st.RUNNING, reason="x", message="y", generation=1, old=old, now=1.0)
    assert status["history"] == old["history"]
    assert st.status_patch(old, status) is None or "history" not in st.status_patch(old, status)
