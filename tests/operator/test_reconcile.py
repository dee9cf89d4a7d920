"""The job loop against in-memory fakes of the API server and Prometheus: a whole job, restarts,
failures, the stop rules, and equality with a plain TuningSession run (what `qtune tune` does)."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from opfakes import FakeKube, FakePoller, FakeResults, job_body, make_config, tiny_baseline, tiny_space

from qtune.operator import constants as c
from qtune.operator import pods as podlib
from qtune.operator import status as st
from qtune.operator.config import OperatorConfig
from qtune.operator.metrics import OperatorMetrics
from qtune.operator.reconcile import JobReconciler, Services, StepResult, can_resume, resumable_status, validate
from qtune.tuning import stop
from qtune.tuning.config import TuneConfig
from qtune.tuning.history import History
from qtune.tuning.session import TuningSession


def accuracy_of(tune_config: dict[str, Any]) -> float:
    """Deterministic fake accuracy: quantizing fc costs 2 points, each conv 0.2 (criterion: 1%)."""
    config = TuneConfig.from_dict(tune_config)
    quantized = set(config.quantized_ops())
    return 0.95 - 0.02 * ("fc" in quantized) - 0.002 * len(quantized - {"fc"})


def result_of(tune_config: dict[str, Any]) -> dict[str, Any]:
    config = TuneConfig.from_dict(tune_config)
    size = 400_000 - 100_000 * len(config.quantized_ops())
    return {"status": "succeeded", "accuracy": accuracy_of(tune_config), "latency_ms": {"1": 0.5, "32": 5.0},
            "latency_p90_ms": {"1": 0.6, "32": 6.0}, "model_size_bytes": size, "timings": {"total": 1.0}}


class World:
    """The fakes plus a clock; `step()` runs one loop step of the job."""

    def __init__(self, body: dict[str, Any] | None = None, config: OperatorConfig | None = None) -> None:
        self.kube = FakeKube()
        self.results = FakeResults()
        self.now = 1_000_000.0
        self.events: list[tuple[str, str, str]] = []
        self.body = body or job_body()
        self.metrics = OperatorMetrics()
        self.services = Services(kube=self.kube, config=config or make_config(), metrics=self.metrics,  # type: ignore[arg-type]
                                 prometheus=self.results, pushgateway=self.results,  # type: ignore[arg-type]
                                 clock=lambda: self.now)
        self.restart()

    def restart(self) -> None:
        """A new operator process: nothing remembered but what is in the (fake) cluster."""
        self.body["status"] = copy.deepcopy(self.kube.status)
        self.reconciler = JobReconciler(self.services, podlib.JobRef.from_body(self.body),
                                        lambda kind, reason, message: self.events.append((kind, reason, message)))

    def pods(self) -> list[podlib.PodSummary]:
        return [podlib.summarize_pod(p) for p in self.kube.pods.values()]

    def step(self) -> StepResult:
        self.now += 1.0
        return asyncio.run(self.reconciler.step(self.body, self.pods()))

    def trial_pods(self) -> dict[str, dict[str, Any]]:
        return {n: p for n, p in self.kube.pods.items() if p["metadata"]["labels"][c.LABEL_ROLE] == "trial"}

    def run_baseline(self) -> None:
        assert self.step().state == st.BASELINE
        assert c.baseline_pod("digits") in self.kube.pods
        self.kube.publish_baseline()
        self.kube.finish_pod(c.baseline_pod("digits"))

    def finish_running_trials(self, push: bool = True) -> list[int]:
        done = []
        for name, pod in self.trial_pods().items():
            if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                continue
            index = int(pod["metadata"]["labels"][c.LABEL_TRIAL])
            args = pod["spec"]["containers"][0]["args"]
            import json

            tune_config = json.loads(args[args.index("--config") + 1])
            if push:
                self.results.results[str(index)] = result_of(tune_config)
            self.kube.finish_pod(name)
            done.append(index)
        return done

    def run_to_end(self, limit: int = 100) -> StepResult:
        for _ in range(limit):
            result = self.step()
            if result.done:
                return result
            self.finish_running_trials()
        raise AssertionError("the job did not finish")


def local_run(parallel: int, max_trials: int = 6) -> tuple[str | None, list[str]]:
    """What the local driver does with the same session logic, trials finishing in index order."""
    body = job_body()
    spec, _ = validate(body)
    history = History(job="digits", baseline=tiny_baseline())
    session = TuningSession(spec, tiny_space(), tiny_baseline(), history)
    while True:
        if not history.pending():
            reason = session.finished_reason()
            if reason:
                break
        started = session.start_trials(parallel - len(history.pending()))
        if not started and not history.pending():
            break
        for record in sorted(history.pending(), key=lambda t: t.index):
            session.record_result(record.index, result_of(record.tune_config))
    best = session.best()
    return (best.config_key if best else None), [t.config_key for t in history.trials]


def test_a_whole_job() -> None:
    world = World()
    world.run_baseline()
    assert {k for k, _ in world.kube.objects} == {"ServiceAccount", "Role", "RoleBinding"}
    result = world.run_to_end()
    assert result.state == st.SUCCEEDED_STATE
    status = world.kube.status
    assert status["state"] == "Succeeded" and status["reason"] in (stop.GOAL_REACHED, stop.MAX_TRIALS)
    conditions = {cond["type"]: cond["status"] for cond in status["conditions"]}
    assert conditions == {"Ready": "True", "Running": "False", "Succeeded": "True", "Failed": "False"}
    best_key, keys = local_run(parallel=2)
    assert status["best"]["configKey"] == best_key
    history = [t["configKey"] for t in status["recentTrials"]]
    assert history == keys[-len(history):]
    # no trial ran twice; pods of succeeded trials and every Pushgateway group are gone
    assert len(world.kube.created_pods) == len(set(world.kube.created_pods))
    assert not world.trial_pods()
    assert not world.results.results
    assert status["best"]["modelPath"].endswith(f"/trials/{status['best']['trial']}/model")
    reasons = [reason for _, reason, _ in world.events]
    assert reasons[0] == st.BASELINE and "BaselineReady" in reasons and st.RUNNING in reasons
    assert world.metrics.trials_started._value.get() == status["trials"]["started"]


def test_parallel_trials_are_bounded() -> None:
    world = World()
    world.run_baseline()
    for _ in range(12):
        world.step()
        running = [p for p in world.trial_pods().values() if p.get("status", {}).get("phase") is None]
        assert len(running) <= 2
        world.finish_running_trials()


def test_restart_adopts_running_pods_and_repeats_nothing() -> None:
    world = World()
    world.run_baseline()
    world.step()                      # trial 0 starts
    world.finish_running_trials()
    world.step()                      # trial 0 recorded, next trials start
    started = list(world.kube.created_pods)
    world.restart()                   # the operator restarts; trials 1, 2 are still running
    world.step()
    assert world.kube.created_pods == started  # adopted, not created again
    world.finish_running_trials()
    world.restart()                   # restart again before their results are read
    world.run_to_end()
    trials = [n for n in world.kube.created_pods if "trial" in n]
    assert len(trials) == len(set(trials))
    assert world.kube.status["trials"]["started"] == len(trials)
    assert world.kube.status["best"]["configKey"] == local_run(parallel=2)[0]


def test_a_trial_saved_but_never_launched_is_launched_after_a_restart() -> None:
    world = World()
    world.run_baseline()

    async def refuse(body: dict[str, Any]) -> bool:
        raise OSError("connection reset")

    real = world.kube.create_pod
    world.kube.create_pod = refuse  # type: ignore[method-assign]
    with pytest.raises(OSError):
        world.step()                  # trial 0 saved as pending, its pod not created
    world.kube.create_pod = real      # type: ignore[method-assign]
    world.restart()
    world.step()
    assert list(world.trial_pods()) == ["digits-trial-0"]


def test_a_finished_trial_whose_pod_vanished_is_recorded_not_rerun() -> None:
    world = World()
    world.run_baseline()
    world.step()
    world.finish_running_trials()
    del world.kube.pods["digits-trial-0"]   # e.g. deleted by hand while the operator was down
    world.restart()
    world.step()
    assert world.kube.created_pods.count("digits-trial-0") == 1
    assert world.kube.status["recentTrials"][0]["status"] == "succeeded"


def test_invalid_spec_fails_without_pods() -> None:
    body = job_body()
    body["spec"]["tuning"]["strategy"] = "nope"
    world = World(body)
    result = world.step()
    assert result.done and result.state == st.FAILED_STATE
    assert world.kube.status["reason"] == st.INVALID_SPEC
    assert "spec.tuning.strategy" in world.kube.status["message"]
    assert not world.kube.pods
    assert world.events[0][0] == "Warning"


def test_oom_killed_trials_count_against_max_failed_trials() -> None:
    body = job_body()
    body["spec"]["tuning"]["maxFailedTrials"] = 1
    world = World(body)
    world.run_baseline()
    world.step()
    world.kube.finish_pod("digits-trial-0", phase="Failed", reason="OOMKilled", exitCode=137)
    result = world.step()
    assert result.done and world.kube.status["reason"] == stop.TOO_MANY_FAILURES
    assert world.kube.status["state"] == "Failed"
    assert world.kube.status["recentTrials"][0]["reason"] == "OOMKilled"
    assert ("Warning", "OOMKilled") in [(k, r) for k, r, _ in world.events]


def test_missing_metrics_fail_the_trial_after_the_timeout() -> None:
    world = World(config=OperatorConfig(metrics_timeout=5.0))
    world.run_baseline()
    world.step()
    world.finish_running_trials(push=False)
    assert world.step().wait == world.services.config.metrics_poll_interval
    world.now += 10
    world.step()
    trial = world.kube.status["recentTrials"][0]
    assert trial["status"] == "failed" and trial["reason"] == "MetricsUnavailable"


def test_baseline_failure_fails_the_job() -> None:
    world = World()
    world.step()
    world.kube.finish_pod(c.baseline_pod("digits"), phase="Failed", exitCode=1,
                          message="spec.quantization.opWise.x: no quantizable op named 'x'")
    result = world.step()
    assert result.done and world.kube.status["reason"] == st.BASELINE_FAILED
    assert "no quantizable op" in world.kube.status["message"]


def test_job_timeout_abandons_running_trials() -> None:
    body = job_body()
    body["spec"]["tuning"]["timeoutSeconds"] = 30
    world = World(body)
    world.run_baseline()
    world.step()
    world.step()
    world.now += 60
    result = world.step()
    assert result.done and world.kube.status["stopReason"] == stop.TIMEOUT
    assert world.kube.status["reason"] == stop.NO_CONFIG  # nothing finished in time
    assert "digits-trial-0" in world.kube.deleted_pods


def test_raising_max_trials_continues_a_finished_job() -> None:
    body = job_body()
    body["spec"]["tuning"]["maxTrials"] = 2
    world = World(body)
    world.run_baseline()
    world.run_to_end()
    status = world.kube.status
    assert status["stopReason"] == stop.MAX_TRIALS and status["trials"]["started"] == 2
    assert resumable_status(status, 4) and not resumable_status(status, 2)
    body["spec"]["tuning"]["maxTrials"] = 4
    body["metadata"]["generation"] = 2
    world.kube.status.update(state=st.RUNNING, reason=st.RESUMED)  # what the field handler patches
    world.restart()
    world.step()
    assert world.kube.status["state"] == st.RUNNING
    world.run_to_end()
    assert world.kube.status["trials"]["started"] > 2
    assert st.RESUMED in [reason for _, reason, _ in world.events]


def test_can_resume_only_after_max_trials() -> None:
    spec, _ = validate(job_body())
    history = History(job="digits", stop_reason=stop.GOAL_REACHED)
    assert not can_resume(history, spec)
    history.stop_reason = stop.MAX_TRIALS
    assert can_resume(history, spec)


def test_a_result_is_recorded_as_soon_as_it_is_queryable() -> None:
    world = World()
    poller = FakePoller()
    world.services.poller = poller  # type: ignore[assignment]
    world.run_baseline()
    world.step()                                   # trial 0 running
    world.kube.run_pod("digits-trial-0")
    pod = world.kube.pods["digits-trial-0"]
    args = pod["spec"]["containers"][0]["args"]
    import json

    poller.snapshot = {"0": result_of(json.loads(args[args.index("--config") + 1]))}
    world.step()                                   # recorded while the pod is still reported Running
    assert world.kube.status["trials"]["finished"] == 1
    assert "digits-trial-1" in world.kube.pods     # the next trials started at once
    assert "digits-trial-0" in world.kube.pods     # the pod itself goes once it is reported finished
    poller.snapshot = {}
    world.kube.finish_pod("digits-trial-0")
    world.step()
    assert "digits-trial-0" not in world.kube.pods
    assert world.kube.created_pods.count("digits-trial-0") == 1


def test_kept_pods_are_cleaned_once() -> None:
    world = World(config=OperatorConfig(keep_succeeded_pods=True))
    world.run_baseline()
    world.step()
    world.finish_running_trials()
    world.step()
    deleted = len(world.results.deleted)
    for _ in range(3):
        world.step()
    assert len(world.results.deleted) == deleted   # no repeated DELETEs for pods that stay
    assert "digits-trial-0" in world.kube.pods


def test_a_failed_baseline_runs_again_after_the_spec_is_edited() -> None:
    from qtune.operator.handlers import job_active

    world = World()
    world.step()
    world.kube.finish_pod(c.baseline_pod("digits"), phase="Failed", reason="OOMKilled", exitCode=137)
    assert world.step().done
    status = world.kube.status
    assert status["reason"] == st.BASELINE_FAILED and "OOMKilled" in status["message"]
    assert not job_active(status=status, meta=world.body["metadata"])
    world.body["spec"]["trial"]["resources"]["memory"] = "8Gi"
    world.body["metadata"]["generation"] = 2
    assert job_active(status=status, meta=world.body["metadata"])
    world.restart()                                   # Kopf starts the job's loop again
    assert world.step().state == st.BASELINE
    pod = world.kube.pods[c.baseline_pod("digits")]
    assert pod["spec"]["containers"][0]["resources"]["limits"]["memory"] == "8Gi"
    assert world.kube.created_pods.count(c.baseline_pod("digits")) == 2
    world.kube.publish_baseline()
    world.kube.finish_pod(c.baseline_pod("digits"))
    assert world.run_to_end().state == st.SUCCEEDED_STATE
