"""The operator's cleanup policy: failed pods beyond the newest N go once recorded; when a job ends, a
short self-contained pod deletes the models of all trials but the winner (keep-best), or nothing
(keep-all, operator setting or the job's spec.workspace.trialModels). Also the failure policy's
backoff and RepeatedFailures stop as the operator runs them (the same session)."""

from __future__ import annotations

from typing import Any

import pytest
from opfakes import job_body, make_config
from test_reconcile import World, spec_dict

from qtune import protocol
from qtune.operator import builders, cleanup
from qtune.operator import constants as c
from qtune.operator import status as st
from qtune.operator.config import OperatorConfig
from qtune.operator.layout import JobRef
from qtune.operator.podstatus import PodSummary
from qtune.operator.reconcile import validate
from qtune.tuning import stop


def _config(**overrides: Any) -> OperatorConfig:
    return OperatorConfig(**{**make_config().__dict__, **overrides})


def _run(world: World, limit: int = 100) -> Any:
    for _ in range(limit):
        result = world.step()
        if result.done:
            return result
        world.now += 30.0  # past any backoff
        world.finish_running()
    raise AssertionError("the job did not finish")


def test_failed_pods_beyond_the_newest_n_are_deleted_their_failures_stay_in_the_history() -> None:
    body = job_body(spec=spec_dict(strategy="random", maxTrials=6, maxConsecutiveFailures=0))
    world = World(body, config=_config(cleanup_failed_pods=2))
    world.runner.fail_trials = {0, 1, 2, 3, 4}
    _run(world)
    failed = {n for n, p in world.kube.pods.items() if p.get("status", {}).get("phase") == "Failed"}
    assert failed == {"digits-trial-3", "digits-trial-4"}
    assert {"digits-trial-0", "digits-trial-1", "digits-trial-2"} <= set(world.kube.deleted_pods)
    history = world.history()
    assert [t.reason for t in history.trials[:5]] == ["Crashed"] * 5
    assert all(t.message == "simulated crash" for t in history.trials[:5])


def test_the_failed_pod_order_is_by_when_they_ended() -> None:
    def pod(name: str, finished: float) -> PodSummary:
        return PodSummary(name=name, namespace="ml", job_uid="u", unit=name, attempt=0, phase="Failed",
                          finished=finished)

    pods = [pod("a", 3.0), pod("b", 1.0), pod("c", 2.0), PodSummary("d", "ml", "u", "d", 0, "Succeeded")]
    assert [p.name for p in cleanup.failed_pods_to_delete(pods, 1)] == ["c", "b"]
    assert [p.name for p in cleanup.failed_pods_to_delete(pods, 0)] == ["a", "c", "b"]
    assert cleanup.failed_pods_to_delete(pods, 5) == []


def test_the_model_cleanup_pod_plan() -> None:
    body = job_body()
    spec, _ = validate(body)
    job = JobRef.from_body(body)
    unit = cleanup.model_cleanup_unit(spec, make_config(), 7)
    assert unit is not None and unit.id == protocol.UnitKind.CLEANUP and unit.candidates == (7,)
    trial = builders.unit_pod(job, spec, builders.UnitPlan(unit="trial-1", tune_config={}), make_config())
    pod = cleanup.cleanup_pod(builders.unit_pod(job, spec, builders.UnitPlan(unit=unit.id, candidates=(7,)),
                                                make_config()))
    container = pod["spec"]["containers"][0]
    workspace = container["workingDir"]
    assert container["args"] == ["cleanup", "--workspace", workspace, "--keep", "7"]
    assert container["image"] == trial["spec"]["containers"][0]["image"]
    # the job's own workspace mounts, as a trial has them; no result Secret, no inputs ConfigMap
    trial_mounts = [m for m in trial["spec"]["containers"][0]["volumeMounts"] if m["name"] != "inputs"]
    assert container["volumeMounts"] == trial_mounts
    assert "inputs" not in [v["name"] for v in pod["spec"]["volumes"]]
    assert not [e for e in container["env"] if "secretKeyRef" in (e.get("valueFrom") or {})]
    assert pod["metadata"]["labels"][c.LABEL_ROLE] == c.ROLE_CLEANUP
    assert pod["metadata"]["name"] == "digits-cleanup"
    assert pod["spec"]["automountServiceAccountToken"] is False
    # no winner: every model goes
    none = cleanup.model_cleanup_unit(spec, make_config(), None)
    assert none is not None and none.candidates == ()
    # the configs on the accuracy-speed front keep their models beside the winner's
    front = cleanup.model_cleanup_unit(spec, make_config(), 7, [9, 3, 7])
    assert front is not None and front.candidates == (3, 7, 9)


@pytest.mark.parametrize("setting,job_says,expected", [("keep-all", None, False), ("keep-best", "keep-all", False),
                                                       ("keep-all", "keep-best", True)])
def test_keep_all_starts_no_cleanup_pod_and_the_job_wins(setting: str, job_says: str | None,
                                                          expected: bool) -> None:
    spec = spec_dict(objective="size", maxTrials=2)
    if job_says:
        spec["workspace"]["trialModels"] = job_says
    world = World(job_body(spec=spec), config=_config(cleanup_trial_models=setting))
    world.run_to_end()
    assert ("digits-cleanup" in world.kube.created_pods) is expected


def test_the_trial_models_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="keep-best, keep-all"):
        _config(cleanup_trial_models="keep-some")
    with pytest.raises(ValueError, match="cleanup_failed_pods"):
        _config(cleanup_failed_pods=-1)


def test_the_operator_stops_on_repeated_oom_kills_and_backs_off_between_them() -> None:
    world = World(job_body(spec=spec_dict(strategy="random", maxTrials=8)))
    world.step()
    world.finish_running()                                      # the baseline
    world.step()
    waits = []
    for index in range(3):
        world.kube.finish_pod(f"digits-trial-{index}", phase="Failed", reason="OOMKilled", exitCode=137)
        result = world.step()
        if result.done:
            break
        waits.append(result.wait)
        assert f"digits-trial-{index + 1}" not in world.kube.pods  # not at once: backing off
        world.now += 5.0 * 2 ** index
        world.step()
        assert f"digits-trial-{index + 1}" in world.kube.pods
    assert waits and all(w <= 10.0 for w in waits)
    status = world.kube.status
    assert result.done and status["state"] == st.FAILED_STATE
    assert status["stopReason"] == stop.REPEATED_FAILURES and status["reason"] == stop.REPEATED_FAILURES
    assert status["message"].startswith("RepeatedFailures: 3 trials in a row were OOMKilled (trials 0, 1, 2): "
                                        "trial-2 (pod digits-trial-2) was killed (OOMKilled, exit code 137) for "
                                        "exceeding its memory limit of 1Gi")
    assert "raise spec.trial.resources.memory" in status["message"]


def test_repeated_failures_after_a_passing_trial_end_failed_with_the_best_and_the_reason() -> None:
    """The cluster half of one rule (`stop.succeeded`): the same outcome that makes `qtune tune` exit 5 ends
    the job Failed, its reason RepeatedFailures, the best passing config still in status.best and named in the
    message (tests/integration/test_repeated_failures_exit.py is the local half)."""
    world = World(job_body(spec=spec_dict(strategy="random", maxTrials=8, minSpeedup=50.0)))
    world.runner.accuracy = lambda config: 0.95                 # every config passes the criterion
    world.step()
    world.finish_running()                                      # the baseline
    world.step()
    world.finish_running()                                      # trial 0 passes (not 50x faster: no goal)
    for _ in range(20):
        result = world.step()
        if result.done:
            break
        for name in sorted(world.running_pods()):
            world.kube.finish_pod(name, phase="Failed", reason="OOMKilled", exitCode=137)
        world.now += 61.0                                       # past any backoff
    status = world.kube.status
    assert result.done and status["state"] == st.FAILED_STATE
    assert status["reason"] == status["stopReason"] == stop.REPEATED_FAILURES
    assert status["best"]["trial"] == 0
    assert "Best passing config so far: trial 0" in status["message"]
    failed = [c for c in status["conditions"] if c["type"] == st.FAILED_COND]
    assert failed and failed[0]["status"] == "True" and failed[0]["reason"] == stop.REPEATED_FAILURES
