"""The real reconciler driving the real tuning session against in-memory fakes of the API server and
Prometheus: a whole job (objective latency and size, sequential and parallel) picks the same trials
and winner as `qtune.tuning.engine.drive` with the same simulated runner; restarts, forged results,
failures, errors that must reach the status. No test here has a tuning loop of its own."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from typing import Any

import kopf
import pytest
from kubernetes.client import ApiException
from opfakes import SIGNING_KEY, FakeKube, FakePoller, FakeResults, inputs_of, job_body, make_config
from simulated import SimulatedExecutor, run_simulated, sensitive_accuracy, simulated_space

from qtune import protocol
from qtune.operator import constants as c
from qtune.operator import status as st
from qtune.operator.config import OperatorConfig
from qtune.operator.layout import JobRef
from qtune.operator.metrics import OperatorMetrics
from qtune.operator.podstatus import PodSummary, summarize_pod
from qtune.operator.reconcile import JobReconciler, Services, StepResult, status_resume_message, validate
from qtune.operator.results import Observed
from qtune.tuning import codec, stop
from qtune.tuning.config import TuneConfig
from qtune.tuning.engine import UnitFailure
from qtune.tuning.session import WorkUnit

BASELINE_POD = "digits-baseline"


def spec_dict(**tuning: Any) -> dict[str, Any]:
    return {
        "model": {"framework": "onnxruntime", "path": "model.onnx"},
        "data": {"calibration": {"path": "calib.npz"}, "evaluation": {"path": "eval.npz"}},
        "tuning": {"maxTrials": 8, "parallelTrials": 1, "objective": "latency", **tuning},
        "benchmark": {"batchSizes": [1, 32]},
        "trial": {"resources": {"cpu": 2, "memory": "1Gi"}},
        "workspace": {"persistentVolumeClaim": "qtune-work", "mountPath": "/workspace"},
    }


class World:
    """The fakes, a clock, and a simulated runner playing every pod the operator creates."""

    def __init__(self, body: dict[str, Any] | None = None, config: OperatorConfig | None = None) -> None:
        self.kube = FakeKube()
        self.results = FakeResults()
        self.now = 1_000_000.0
        self.events: list[tuple[str, str, str]] = []
        self.body = body or job_body(spec=spec_dict())
        self.metrics = OperatorMetrics()
        self.services = Services(kube=self.kube, config=config or make_config(), metrics=self.metrics,  # type: ignore[arg-type]
                                 prometheus=self.results, pushgateway=self.results,  # type: ignore[arg-type]
                                 clock=lambda: self.now)
        self.space = simulated_space()
        self.runner = SimulatedExecutor(validate(self.body)[0], self.space, sensitive_accuracy())
        self.restart()

    def restart(self) -> None:
        """A new operator process: nothing remembered but what is in the (fake) cluster."""
        self.body["status"] = copy.deepcopy(self.kube.status)
        self.reconciler = JobReconciler(self.services, JobRef.from_body(self.body),
                                        lambda kind, reason, message: self.events.append((kind, reason, message)))

    def pods(self) -> list[PodSummary]:
        return [summarize_pod(p) for p in self.kube.pods.values()]

    def step(self) -> StepResult:
        self.now += 1.0
        return asyncio.run(self.reconciler.step(self.body, self.pods()))

    def traced_step(self) -> tuple[StepResult, int]:
        """One step and the peak of memory Python allocated during it (tracemalloc), in bytes."""
        import gc
        import tracemalloc

        gc.collect()
        tracemalloc.start()
        try:
            result = self.step()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return result, peak

    def running_pods(self) -> dict[str, dict[str, Any]]:
        return {n: p for n, p in self.kube.pods.items() if p.get("status", {}).get("phase") not in
                ("Succeeded", "Failed")}

    def unit_of(self, pod: dict[str, Any]) -> WorkUnit:
        """What the runner in the pod reads: its labels, args and mounted inputs (annotations or ConfigMap)."""
        unit = pod["metadata"]["labels"][c.LABEL_UNIT]
        inputs = inputs_of(pod, self.kube.configmaps)
        assert c.JOB_FILE in inputs
        config = json.loads(inputs.get(c.CONFIG_FILE, "{}"))
        if unit == protocol.UnitKind.BASELINE:
            return WorkUnit.baseline()
        if unit == protocol.UnitKind.CONFIRM:
            args = pod["spec"]["containers"][0]["args"]
            candidates = tuple(int(i) for i in args[args.index("--candidates") + 1].split(","))
            return WorkUnit(unit, protocol.UnitKind.CONFIRM, candidates=candidates,
                            candidate_configs={k: codec.load(TuneConfig, v) for k, v in config.items()})
        index = protocol.unit_trial_index(unit)
        return WorkUnit(unit, protocol.UnitKind.TRIAL, index, codec.load(TuneConfig, config))

    def secret_of(self, pod: dict[str, Any]) -> str:
        """The pod's env QTUNE_RESULT_SECRET, resolved from its own Secret (secretKeyRef)."""
        env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
        ref = env["QTUNE_RESULT_SECRET"]["valueFrom"]["secretKeyRef"]
        return self.kube.objects[("Secret", ref["name"])]["stringData"][ref["key"]]

    def push(self, unit: str, result: protocol.Result, secret: str | None) -> None:
        """Through the protocol's metric table, as Prometheus would serve it."""
        signature = protocol.sign_result(self.reconciler.job.uid, unit, result, secret) if secret else None
        decoded, sig = protocol.decode_result(protocol.encode_result(result, signature))
        self.results.results[unit] = Observed(unit, decoded, sig)

    def finish(self, name: str, push: bool = True) -> None:
        pod = self.kube.pods[name]
        if pod["metadata"]["labels"][c.LABEL_UNIT] == protocol.UnitKind.CLEANUP:
            self.kube.finish_pod(name)  # it deletes models in the workspace; no result
            return
        unit = self.unit_of(pod)
        outcome = self.runner._result(unit)
        if isinstance(outcome.result, UnitFailure):
            self.kube.finish_pod(name, phase="Failed", exitCode=protocol.EXIT_TRIAL_FAILED,
                                 message=protocol.termination_message(outcome.result.reason, outcome.result.message))
            return
        if unit.id == protocol.UnitKind.BASELINE:  # as the runner does: publish, then sign the stored value's hash
            data, binary = protocol.encode_document(c.SPACE_KEY, codec.dump(self.space))
            self.kube.configmaps[c.baseline_configmap("digits")].update(data=data, binaryData=binary)
            stored = protocol.stored_value({"data": data, "binaryData": binary}, c.SPACE_KEY)
            assert stored is not None
            outcome.result = outcome.result.model_copy(update={"space_sha256": protocol.value_sha256(stored[1])})
        if push:
            self.push(unit.id, outcome.result, self.secret_of(pod))
        self.kube.finish_pod(name)

    def finish_running(self, push: bool = True) -> list[str]:
        names = sorted(self.running_pods())
        for name in names:
            self.finish(name, push)
        return names

    def run_to_end(self, limit: int = 200, restart_every: int = 0) -> StepResult:
        for i in range(limit):
            result = self.step()
            if result.done:
                return result
            self.finish_running()
            if restart_every and i % restart_every == restart_every - 1:
                self.restart()
        raise AssertionError("the job did not finish")

    def history(self) -> Any:
        from qtune.operator.store import decode_history

        return decode_history(self.kube.configmaps["digits-history"])


def _drive(body: dict[str, Any]) -> Any:
    """The same job through qtune.tuning.engine.drive with the same simulated runner."""
    spec = validate(body)[0]
    session, _, reason = run_simulated(spec, simulated_space(), sensitive_accuracy())
    return session, reason


@pytest.mark.parametrize("objective,parallel", [("latency", 1), ("latency", 3), ("size", 1), ("size", 2)])
def test_a_whole_job_is_the_engine_run(objective: str, parallel: int) -> None:
    body = job_body(spec=spec_dict(objective=objective, parallelTrials=parallel))
    world = World(body)
    result = world.run_to_end()
    session, reason = _drive(body)
    history = world.history()
    assert [t.config_key for t in history.trials] == [t.config_key for t in session.history.trials]
    assert history.stop_reason == reason and history.outcome == session.outcome()
    status = world.kube.status
    best = session.best()
    assert best is not None and status["best"]["configKey"] == best.config_key
    assert status["reason"] == session.outcome()
    assert result.state == st.state_for_outcome(session.outcome())
    if objective == "latency":
        measured = session.best_speed()
        assert measured is not None
        assert status["best"]["speed"]["speedup"] == round(measured.speedup, 4)
        assert status["best"]["speed"]["fp32LatencyMs"] == round(measured.fp32_p50_ms, 5)
        assert status["best"]["speed"]["latencyMs"] == round(measured.p50_ms, 5)
        assert status["best"]["speed"]["confirmed"] is True
        assert any(name.startswith("digits-confirm") for name in world.kube.created_pods)
    # every pod ran once; secrets, inputs, succeeded pods and Pushgateway groups are gone; the models of
    # all trials but the winner are being deleted (cleanup policy keep-best, a pod without Secret or inputs)
    assert len(world.kube.created_pods) == len(set(world.kube.created_pods))
    assert set(world.kube.pods) == {"digits-cleanup"} and not world.results.results
    args = world.kube.pods["digits-cleanup"]["spec"]["containers"][0]["args"]
    assert args[0] == "cleanup" and args[args.index("--keep") + 1] == str(best.index)
    assert not [k for k in world.kube.objects if k[0] == "Secret"]
    assert set(world.kube.configmaps) == {"digits-history", "digits-baseline"}
    conditions = {cond["type"]: cond["status"] for cond in status["conditions"]}
    assert conditions["Ready"] == ("True" if result.state == st.SUCCEEDED_STATE else "False")
    assert world.metrics.registry.get_sample_value("qtune_operator_trials_started_total") == status["trials"]["started"]


def test_operator_restarts_change_nothing() -> None:
    body = job_body(spec=spec_dict(parallelTrials=2))
    world = World(body)
    world.run_to_end(restart_every=2)
    session, _ = _drive(body)
    assert [t.config_key for t in world.history().trials] == [t.config_key for t in session.history.trials]
    assert world.kube.status["best"]["configKey"] == session.best().config_key
    assert len(world.kube.created_pods) == len(set(world.kube.created_pods))


def test_a_forged_result_is_ignored_and_the_real_one_recorded() -> None:
    world = World()
    poller = FakePoller()
    world.services.poller = poller  # type: ignore[assignment]
    world.step()
    world.finish_running()                          # the baseline
    world.step()                                    # trial 0 starts
    pod = world.kube.pods["digits-trial-0"]
    world.kube.run_pod("digits-trial-0")
    forged = protocol.TrialResult(trial=0, status="succeeded", accuracy=0.999, config_key=None,
                                  speed={"32": protocol.SpeedMeasurement(
                                      batch_size=32, p50_ms=0.001, p90_ms=0.001, fp32_p50_ms=10, fp32_p90_ms=10,
                                      speedup=10000, low=9999, high=10001)})
    world.push("trial-0", forged, secret="guessed")  # e.g. curl to the Pushgateway
    poller.snapshot = dict(world.results.results)    # queryable while the trial runs
    world.step()
    world.step()
    assert world.kube.status["trials"]["finished"] == 0
    assert world.metrics.registry.get_sample_value("qtune_operator_results_rejected_total",
                                              {"reason": "BadSignature"}) == 1
    assert [r for _, r, _ in world.events].count("ResultRejected") == 1
    # a correctly signed result counts only once the pod has finished
    world.push("trial-0", world.runner._result(world.unit_of(pod)).result, world.secret_of(pod))
    poller.snapshot = dict(world.results.results)
    world.step()
    assert world.kube.status["trials"]["finished"] == 0
    world.kube.finish_pod("digits-trial-0")
    world.step()
    trial = world.history().trials[0]
    assert trial.status == "succeeded" and trial.accuracy != 0.999
    assert world.kube.status["rejectedResults"] == 1


def _trial_0_succeeds(world: World) -> tuple[Any, str]:
    """Runs the baseline, then trial 0 to success (no push, no termination message yet): its genuine result and
    signature."""
    world.step()
    world.finish_running()                          # the baseline
    world.step()                                    # trial 0 starts
    pod = world.kube.pods["digits-trial-0"]
    genuine = world.runner._result(world.unit_of(pod)).result
    signature = protocol.sign_result(world.reconciler.job.uid, "trial-0", genuine, world.secret_of(pod))
    world.kube.finish_pod("digits-trial-0")
    return genuine, signature


def test_the_signed_result_in_the_termination_message_is_preferred_to_a_spoiled_push() -> None:
    from qtune.runner.metrics import termination_result

    world = World()
    poller = FakePoller()
    world.services.poller = poller  # type: ignore[assignment]
    genuine, signature = _trial_0_succeeds(world)
    world.kube.finish_pod("digits-trial-0", message=termination_result("trial-0", genuine, signature))
    spoiled = genuine.model_copy(update={"notes": ["merged from a sibling group"], "accuracy": 0.1})
    world.results.results["trial-0"] = Observed("trial-0", spoiled, signature)
    poller.snapshot = dict(world.results.results)
    world.step()
    trial = world.history().trials[0]
    assert trial.status == genuine.status and trial.accuracy == genuine.accuracy
    assert world.metrics.registry.get_sample_value("qtune_operator_results_rejected_total",
                                                   {"reason": "BadSignature"}) is None
    assert poller.waiting is True


def test_a_deleted_push_does_not_matter_when_the_termination_message_has_the_result() -> None:
    from qtune.runner.metrics import termination_result

    world = World()
    genuine, signature = _trial_0_succeeds(world)
    world.kube.finish_pod("digits-trial-0", message=termination_result("trial-0", genuine, signature))
    queries = world.results.queries
    world.step()
    assert world.history().trials[0].accuracy == genuine.accuracy
    assert world.results.queries == queries, "Prometheus was not even asked"


def test_pushed_results_only_ignores_the_termination_message() -> None:
    from qtune.runner.metrics import termination_result

    world = World(config=OperatorConfig(**{**make_config().__dict__, "pushed_results_only": True}))
    genuine, signature = _trial_0_succeeds(world)
    world.kube.finish_pod("digits-trial-0", message=termination_result("trial-0", genuine, signature))
    world.step()
    assert world.kube.status["trials"]["finished"] == 0 and world.kube.status["reason"] == st.WAITING_FOR_RESULTS


def test_a_termination_message_signed_with_another_key_is_not_believed() -> None:
    from qtune.runner.metrics import termination_result

    world = World()
    genuine, _ = _trial_0_succeeds(world)
    forged = protocol.sign_result(world.reconciler.job.uid, "trial-0", genuine, "guessed")
    world.kube.finish_pod("digits-trial-0", message=termination_result("trial-0", genuine, forged))
    world.step()
    assert world.kube.status["trials"]["finished"] == 0
    assert world.metrics.registry.get_sample_value("qtune_operator_results_rejected_total",
                                                   {"reason": "BadSignature"}) == 1


def test_a_result_for_a_pod_of_another_namespace_is_not_believed() -> None:
    world = World()
    poller = FakePoller()
    world.services.poller = poller  # type: ignore[assignment]
    world.step()
    world.finish_running()
    world.step()
    impostor = copy.deepcopy(world.kube.pods["digits-trial-0"])
    del world.kube.pods["digits-trial-0"]           # the real pod vanished; a look-alike elsewhere
    impostor["metadata"]["namespace"] = "elsewhere"
    world.kube.pods["impostor"] = impostor
    world.kube.finish_pod("impostor")
    world.push("trial-0", world.runner._result(world.unit_of(impostor)).result, world.secret_of(impostor))
    poller.snapshot = dict(world.results.results)
    world.step()
    assert not world.history().trials[0].done
    assert world.metrics.registry.get_sample_value("qtune_operator_results_rejected_total", {"reason": "NoPod"}) == 1


def test_a_spec_the_cluster_cannot_run_is_invalid() -> None:
    body = job_body(spec=spec_dict(strategy="nope"))
    world = World.__new__(World)
    World.__init__(world, job_body(spec=spec_dict()))
    world.body = body
    world.restart()
    result = world.step()
    assert result.done and world.kube.status["reason"] == st.INVALID_SPEC
    assert "spec.tuning.strategy" in world.kube.status["message"]
    assert not world.kube.pods


def test_a_strategy_that_does_not_import_is_invalid_spec() -> None:
    world = World(job_body(spec=spec_dict(strategy="mycompany.search:Missing")))
    result = world.step()
    assert result.done and world.kube.status["state"] == st.FAILED_STATE
    assert world.kube.status["reason"] == st.INVALID_SPEC
    assert world.kube.status["message"].startswith("spec.tuning.strategy: cannot import")
    assert not world.kube.pods


def test_a_framework_that_does_not_import_fails_the_job_with_invalid_spec() -> None:
    world = World()
    world.step()
    world.kube.finish_pod(BASELINE_POD, phase="Failed", exitCode=protocol.EXIT_JOB_UNUSABLE,
                          message="spec.model.framework: cannot import adaptor mycompany.x:Y: No module named "
                                  "'mycompany'")
    result = world.step()
    assert result.done and world.kube.status["state"] == st.FAILED_STATE
    assert world.kube.status["reason"] == st.INVALID_SPEC
    assert world.kube.status["message"].startswith("spec.model.framework: cannot import adaptor")


def test_oom_killed_trials_count_against_max_failed_trials() -> None:
    world = World(job_body(spec=spec_dict(maxFailedTrials=1)))
    world.step()
    world.finish_running()
    world.step()
    world.kube.finish_pod("digits-trial-0", phase="Failed", reason="OOMKilled", exitCode=137)
    result = world.step()
    assert result.done and world.kube.status["stopReason"] == stop.TOO_MANY_FAILURES
    assert world.kube.status["recentTrials"][0]["reason"] == "OOMKilled"
    assert ("Warning", "OOMKilled") in [(k, r) for k, r, _ in world.events]


def test_missing_results_fail_the_unit_after_the_deadline() -> None:
    config = make_config()
    world = World(config=OperatorConfig(**{**config.__dict__, "results_deadline_seconds": 600.0}))
    world.step()
    world.finish_running()
    world.step()
    world.finish_running(push=False)
    assert world.step().wait == world.services.config.metrics_poll_interval
    world.now += 601
    world.step()
    trial = world.history().trials[0]
    assert trial.status == "failed" and trial.reason == "MetricsUnavailable"


def test_job_timeout_counts_the_baseline_and_cancels_running_units() -> None:
    world = World(job_body(spec=spec_dict(timeoutSeconds=30)))
    world.step()
    world.now += 25                                  # a slow baseline
    world.finish_running()
    world.step()                                     # trial 0 starts
    world.now += 10
    result = world.step()
    assert result.done and world.kube.status["stopReason"] == stop.TIMEOUT
    assert "digits-trial-0" in world.kube.deleted_pods
    assert world.history().trials[0].reason == stop.TIMEOUT


def test_raising_max_trials_continues_a_finished_job() -> None:
    body = job_body(spec=spec_dict(maxTrials=2, objective="size"))
    world = World(body)
    world.run_to_end()
    status = world.kube.status
    assert status["stopReason"] == stop.MAX_TRIALS and status["trials"]["started"] == 2
    assert status_resume_message(status, validate(_with_tuning(body, maxTrials=4))[0]) is not None
    assert status_resume_message(status, validate(body)[0]) is None
    body["spec"]["tuning"]["maxTrials"] = 4
    body["metadata"]["generation"] = 2
    world.kube.status.update(state=st.RUNNING, reason=st.RESUMED)  # what the field handler patches
    world.restart()
    world.run_to_end()
    assert world.kube.status["trials"]["started"] == 4
    assert st.RESUMED in [reason for _, reason, _ in world.events]


def _with_tuning(body: dict[str, Any], **tuning: Any) -> dict[str, Any]:
    edited = copy.deepcopy(body)
    edited["spec"]["tuning"].update(tuning)
    return edited


def _timed_out_world() -> World:
    """A job stopped by its wall-clock limit while trial 0 ran."""
    world = World(job_body(spec=spec_dict(timeoutSeconds=30, objective="size")))
    world.step()
    world.now += 25
    world.finish_running()
    world.step()
    world.now += 10
    assert world.step().done and world.kube.status["stopReason"] == stop.TIMEOUT
    return world


def test_raising_timeout_seconds_continues_a_timed_out_job() -> None:
    from qtune.operator.handlers import budget_changed

    world = _timed_out_world()
    world.step()                                      # a step after the end, the spec unchanged: still over
    assert world.kube.status["state"] in st.TERMINAL and st.RESUMED not in [r for _, r, _ in world.events]
    world.body = _with_tuning(world.body, timeoutSeconds=3600)
    world.body["metadata"]["generation"] = 2
    patch = kopf.Patch()
    asyncio.run(budget_changed(old=30, new=3600, body=kopf.Body(world.body), status=world.kube.status,
                               patch=patch, logger=logging.getLogger("test")))
    assert patch["status"]["state"] == st.RUNNING and "timeoutSeconds is 3600s" in patch["status"]["message"]
    world.kube.status.update(patch["status"])
    world.restart()
    assert world.run_to_end().state == st.SUCCEEDED_STATE
    assert world.kube.status["stopReason"] != stop.TIMEOUT and world.kube.status["trials"]["started"] > 1
    assert st.RESUMED in [reason for _, reason, _ in world.events]


def test_an_edit_that_raises_no_budget_leaves_a_timed_out_job_finished() -> None:
    from qtune.operator.handlers import budget_changed

    world = _timed_out_world()
    world.body = _with_tuning(world.body, timeoutSeconds=31, maxTrials=20)
    world.body["metadata"]["generation"] = 2
    patch = kopf.Patch()
    asyncio.run(budget_changed(old=8, new=20, body=kopf.Body(world.body), status=world.kube.status, patch=patch,
                               logger=logging.getLogger("test")))
    assert not patch                                  # over 31s were used: no more time
    world.restart()
    assert world.step().done and world.kube.status["stopReason"] == stop.TIMEOUT
    assert st.RESUMED not in [reason for _, reason, _ in world.events]


def test_a_failed_baseline_runs_again_after_the_spec_is_edited() -> None:
    from qtune.operator.handlers import job_active

    world = World()
    world.step()
    world.kube.finish_pod(BASELINE_POD, phase="Failed", reason="OOMKilled", exitCode=137)
    assert world.step().done
    status = world.kube.status
    assert status["reason"] == st.BASELINE_FAILED and "OOMKilled" in status["message"]
    assert not job_active(status=status, meta=world.body["metadata"])
    world.body["spec"]["trial"]["resources"]["memory"] = "8Gi"
    world.body["metadata"]["generation"] = 2
    assert job_active(status=status, meta=world.body["metadata"])
    world.restart()                                   # Kopf starts the job's loop again
    assert world.step().state == st.BASELINE
    pod = world.kube.pods["digits-baseline-a1"]
    assert pod["spec"]["containers"][0]["resources"]["limits"]["memory"] == "8Gi"
    assert world.run_to_end().state == st.SUCCEEDED_STATE


def test_api_refusals_become_a_condition_then_fail_the_job() -> None:
    world = World()
    exc = ApiException(status=403, reason="Forbidden")
    exc.body = json.dumps({"message": 'pods "digits-baseline" is forbidden: exceeded quota: compute'})

    async def quota(body: dict[str, Any]) -> bool:
        raise exc

    world.kube.create_pod = quota  # type: ignore[method-assign]
    first = world.step()
    assert not first.done and world.kube.status["reason"] == st.API_ERROR
    assert "exceeded quota: compute" in world.kube.status["message"]
    for _ in range(world.services.config.api_retries - 1):
        result = world.step()
    assert result.done and world.kube.status["state"] == st.FAILED_STATE
    assert "gave up after" in world.kube.status["message"]


def test_a_history_too_large_for_a_configmap_fails_the_job(monkeypatch: pytest.MonkeyPatch) -> None:
    world = World()
    world.step()
    world.finish_running()
    encode = protocol.encode_document
    monkeypatch.setattr("qtune.protocol.encode_document",
                        lambda key, doc, plain_limit=None, limit=None: encode(key, doc, 10, 200))
    result = world.step()
    assert result.done and world.kube.status["reason"] == st.HISTORY_TOO_LARGE
    assert "maxTrials" in world.kube.status["message"]


def test_a_result_is_recorded_as_soon_as_the_pod_has_finished() -> None:
    world = World()
    poller = FakePoller()
    world.services.poller = poller  # type: ignore[assignment]
    world.step()
    world.finish_running()
    world.step()
    world.finish("digits-trial-0")
    poller.snapshot = dict(world.results.results)
    queries = world.results.queries
    world.step()
    assert world.kube.status["trials"]["finished"] == 1
    assert world.results.queries == queries            # the poller's snapshot sufficed
    assert "digits-trial-1" in world.kube.pods


def test_the_secret_is_derived_not_stored() -> None:
    world = World()
    world.step()
    pod = world.kube.pods[BASELINE_POD]
    assert world.secret_of(pod) == protocol.derive_unit_secret(SIGNING_KEY, world.reconciler.job.uid, "baseline", 0)
    assert SIGNING_KEY not in json.dumps(pod)
