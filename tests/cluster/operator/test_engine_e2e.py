"""One tuning, two executors, on the test plane (issue 10's "done when"):

* the digits job with `objective: latency` (sequential, and 2 trials at once) takes the same
  decisions on the cluster as `qtune tune` locally — each run's trial sequence is what the engine
  proposes from that run's figures (replayed), the first proposals are the same, and when the two
  runs' figures lead to the same decisions, the same sequence and winner — with the operator
  SIGKILLed and restarted in the middle;
* a result pushed for a running trial by someone else (another pod, or a plain HTTP push to the
  Pushgateway; unsigned or wrongly signed) is ignored, reported, and the real result recorded;
* a model of 2,000 quantizable ops: its trial pod starts and reports (the tune config reaches the
  pod through its inputs ConfigMap, not argv).

Latency figures differ between two runs by nature, so the checks are about decisions; each test
prints its figures (wall times, winners, speedups) for the record.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import chainmodel
import opcluster
import pytest
import yaml
from clusterlib import wait_for
from kubernetes import client

from qtune.operator import constants as c
from qtune.operator.status import state_for_outcome
from qtune.tuning import codec

TERMINAL = {"Succeeded", "Failed"}


def _wait(cluster: Any, namespace: str, name: str, ok: Any, timeout: float, what: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def check() -> bool:
        seen.clear()
        seen.update(opcluster.job_status(cluster, namespace, name))
        return bool(ok(seen))

    wait_for(check, timeout, what, detail=lambda: json.dumps(seen)[:3000], interval=0.3)
    return dict(seen)


def latency_manifest(name: str, parallel: int) -> dict[str, Any]:
    """examples/digits/job.yaml (strategy basic, objective latency, relative 1%), made short: 4 trials,
    1-CPU units, short benchmarks, and minSpeedup 2 so that the first passing config (about 1.4x) is no
    success and the search goes on into the strategy's later stages."""
    manifest = opcluster.job_manifest(name, strategy="basic", objective="latency", maxTrials=4,
                                      parallelTrials=parallel, minSpeedup=2.0)
    manifest["spec"]["benchmark"] = {"batchSizes": [1, 16], "warmupRuns": 2, "runs": 5, "maxSeconds": 3,
                                     "minRounds": 3, "threads": 1}
    return manifest


def run_locally(manifest: dict[str, Any], source: Path, folder: Path) -> tuple[Any, float]:
    """`qtune tune` (qtune.local) on the same job file, model and data."""
    from qtune.local.driver import tune
    from qtune.spec import load_job

    folder.mkdir(parents=True)
    for name in opcluster.DIGITS_FILES:
        shutil.copy2(source / name, folder / name)
    (folder / "job.yaml").write_text(yaml.safe_dump(manifest))
    started = time.monotonic()
    outcome = tune(load_job(folder / "job.yaml"), folder / "job.yaml", output_dir=folder / "out")
    return outcome, time.monotonic() - started


class ReplayExecutor:
    """An executor that answers each unit with what a recorded run measured for the same config."""

    def __init__(self, history: Any, capacity: int) -> None:
        self.recorded = {t.config_key: t for t in history.trials}
        self.confirmation = history.confirmation
        self.capacity = capacity
        self.units: dict[str, Any] = {}
        self.unknown: list[str] = []
        """Configs the session proposed that the recorded run never ran."""

    def running(self) -> set[str]:
        return set(self.units)

    def start(self, unit: Any) -> None:
        self.units[unit.id] = unit

    def cancel(self, unit_ids: list[str]) -> None:
        for unit_id in unit_ids:
            self.units.pop(unit_id, None)

    def poll(self, wait: float) -> list[Any]:
        from qtune.protocol import ConfirmResult, TrialResult
        from qtune.tuning.engine import UnitFailure, UnitOutcome

        outcomes = []
        for unit_id, unit in sorted(self.units.items()):
            if unit.kind == "confirm":
                done = self.confirmation
                result = (ConfirmResult.model_validate(done.model_dump(exclude={"trials_seen"}))
                          if done is not None and done.status == "succeeded" else None)
                outcomes.append(UnitOutcome(unit_id, result or UnitFailure("Crashed", "no confirmation in the run")))
                continue
            key = unit.tune_config.key()
            record = self.recorded.get(key)
            if record is None:
                self.unknown.append(key)
                outcomes.append(UnitOutcome(unit_id, UnitFailure("Crashed", "never run in the recorded run")))
                continue
            outcomes.append(UnitOutcome(unit_id, TrialResult(
                trial=unit.trial, status=record.status, config_key=key, accuracy=record.accuracy, speed=record.speed,
                model_size_bytes=record.model_size_bytes)))
        self.units.clear()
        return outcomes


def replay(spec: Any, space: Any, history: Any) -> list[str]:
    """The trial sequence the REAL engine loop (qtune.tuning.engine.drive) proposes when each unit is
    answered with what a run recorded: the engine's decisions given THAT run's figures. A run whose
    sequence equals its replay decided as the engine does."""
    from qtune.tuning.engine import Interrupted, drive
    from qtune.tuning.history import History
    from qtune.tuning.session import TuningSession

    fresh = History(job="replay")
    fresh.baseline = copy.deepcopy(history.baseline)
    session = TuningSession(spec, fresh, space, clock=lambda: 0.0)
    executor = ReplayExecutor(history, spec.tuning.parallel_trials)
    try:
        drive(session, executor, lambda: None, poll_wait=0,
              interrupted=lambda: bool(executor.unknown) or len(fresh.trials) > len(history.trials) + 5)
    except Interrupted:  # it proposed a config the run never ran: the sequences differ from here
        pass
    return [t.config_key for t in fresh.trials]


def _speed(record: Any, batch: str = "16") -> str:
    measured = (record.speed or {}).get(batch)
    return f"{measured.speedup:.2f}x [{measured.low:.2f}-{measured.high:.2f}]" if measured else "-"


@pytest.mark.parametrize("parallel", [1, 2], ids=["sequential", "parallel2"])
def test_latency_job_takes_the_same_decisions_on_the_cluster_as_locally(
        cluster: Any, op_namespace: str, workspace: Path, start_operator: Any, tmp_path: Path,
        parallel: int) -> None:
    ns, name = op_namespace, f"digits-latency-p{parallel}"
    manifest = latency_manifest(name, parallel)

    # the cluster, with the operator SIGKILLed once the first trials run and started again
    operator = start_operator([ns])
    started = time.monotonic()
    opcluster.create_job(cluster, ns, manifest)
    _wait(cluster, ns, name, lambda st: st.get("trials", {}).get("started", 0) >= 1 or st.get("state") in TERMINAL,
          240, "the first trial started")
    operator.kill()
    killed_at = opcluster.job_status(cluster, ns, name).get("trials", {})
    time.sleep(5)  # units go on without the operator
    operator.start()
    status = _wait(cluster, ns, name, lambda st: st.get("state") in TERMINAL, 420, "the job finished")
    cluster_seconds = time.monotonic() - started
    cluster_history = opcluster.job_history(cluster, ns, name)

    # the same job locally (after the cluster run: the two never compete for the CPUs)
    local, local_seconds = run_locally(manifest, workspace, tmp_path / "local")
    local_keys = [t.config_key for t in local.history.trials]
    cluster_keys = [t.config_key for t in cluster_history.trials]
    local_best = local.best
    report = [f"parallelTrials {parallel}: cluster {cluster_seconds:.0f}s (operator killed at {killed_at}), "
              f"local {local_seconds:.0f}s",
              f"  local   {local.outcome}: best trial {local_best and local_best.index} "
              f"{local_best and local_best.config_key}, speedup {local.speed and local.speed.describe()}",
              f"  cluster {status.get('reason')}: best trial {status.get('best', {}).get('trial')} "
              f"{status.get('best', {}).get('configKey')}, speedup {status.get('best', {}).get('speedupInterval')}"]
    for side, trials in (("local", local.history.trials), ("cluster", cluster_history.trials)):
        for t in trials:
            report.append(f"  {side:7} trial {t.index} {t.config_key} {t.status} acc {t.accuracy} "
                          f"passed {t.passed} fp32 ops {len(t.tune_config.fp32_ops())} speed@16 {_speed(t)}")
    sys.stderr.write("\n".join(report) + "\n")

    # the job ran to its end (NoSpeedup is a Failed job: no config is 2x faster beyond doubt)
    assert status.get("best") and status["reason"] in ("GoalReached", "NoSpeedup", "MaxTrialsReached",
                                                       "SearchExhausted"), status.get("message")
    assert status["state"] == state_for_outcome(status["reason"])
    # every unit ran once: the kill repeated nothing
    runs = opcluster.pod_runs(cluster, ns)
    assert all(n == 1 for pod, n in runs.items() if pod.startswith(f"{name}-")), runs
    assert [t.index for t in cluster_history.trials] == list(range(len(cluster_history.trials)))
    assert all(t.status == "succeeded" for t in cluster_history.trials), cluster_keys
    # the in-trial fp32 latency made it through Prometheus: the cluster ranks ratios, as locally
    assert all("16" in t.speed and t.speed["16"].fp32_p50_ms > 0 for t in cluster_history.trials if t.passed)

    # the decisions: the same trial sequence, winner and outcome in both modes. Each run's sequence is
    # also what the engine proposes given that run's own figures (replay): the speed stage reads the
    # baseline's op-time profile and the trials' speedups, and is built to propose the same configs
    # from figures that differ by noise (one threshold away from zero; the tie rule for the winner).
    from qtune.operator.store import decode_published
    from qtune.spec import load_job
    from qtune.tuning.space import TuningSpace

    spec = load_job(tmp_path / "local" / "job.yaml").spec
    published = client.CoreV1Api(cluster.api_client()).read_namespaced_config_map(f"{name}-baseline", ns)
    cluster_space = codec.load(TuningSpace, decode_published({"data": published.data,
                                                              "binaryData": published.binary_data}, c.SPACE_KEY))
    assert replay(spec, cluster_space, cluster_history) == cluster_keys, "\n".join(report)
    assert replay(spec, local.space, local.history) == local_keys, "\n".join(report)
    # Two runs measure two sets of figures. The proposals of the defaults and the op-type-restricted stage
    # come from the space's structure; later ones (the speed outlook against minSpeedup, the learning
    # sampler's scores) from the measured figures, and two runs whose figures straddle a bar by noise may
    # go different ways from there (replays showed it: ±5% on a trial's speed or ±20% on the op-time profile
    # flips this job's third proposal). So: the same engine decides both (the replays above), the same
    # first proposals, and where the figures lead to the same decisions, the same sequence, winner, outcome.
    # the same winner and outcome from the same figures: qtune's own session, given the cluster's history,
    # picks what the operator wrote into the status
    from qtune.tuning.session import TuningSession

    judged = TuningSession(spec, copy.deepcopy(cluster_history), cluster_space)
    judged_best = judged.best()
    assert judged_best is not None and status["best"]["trial"] == judged_best.index, "\n".join(report)
    assert status["best"]["configKey"] == judged_best.config_key
    assert status["reason"] == judged.outcome(), "\n".join(report)
    same = cluster_keys == local_keys
    common = next((i for i, (a, b) in enumerate(zip(cluster_keys, local_keys, strict=False)) if a != b),
                  min(len(cluster_keys), len(local_keys)))
    sys.stderr.write(f"  same trial sequence: {same}" + ("" if same else f" (the first {common} trials)") + "\n")
    assert common >= 1, "\n".join(report)
    if not same:
        return
    assert status["reason"] == local.outcome, "\n".join(report)
    assert local_best is not None and status["best"]["configKey"] == local_best.config_key, "\n".join(report)
    assert status["best"]["trial"] == local_best.index
    if cluster_history.confirmation and local.history.confirmation:
        assert cluster_history.confirmation.candidates == local.history.confirmation.candidates


# ------------------------------------------------------------------------------------------------
# results that do not come from the trial's own pod
# ------------------------------------------------------------------------------------------------


def _events(cluster: Any, namespace: str, reason: str) -> list[Any]:
    core = client.CoreV1Api(cluster.api_client())
    return [e for e in core.list_namespaced_event(namespace).items if e.reason == reason]


def _forger_pod(namespace: str, gateway: str, job_uid: str) -> dict[str, Any]:
    """A pod of the same namespace (not the job's) pushing a result for trial 0, unsigned (it has no
    secret), with the job's own labels: what any tenant of the namespace could do."""
    script = ("from qtune.runner.metrics import push_result\n"
              f"push_result({gateway!r}, {job_uid!r}, 'trial-0', "
              "{'status': 'succeeded', 'accuracy': 0.999, 'speed': {'16': {'batch_size': 16, 'p50_ms': 0.001, "
              "'p90_ms': 0.001, 'fp32_p50_ms': 1.0, 'fp32_p90_ms': 1.0, 'speedup': 1000.0, 'low': 999.0, "
              "'high': 1001.0}}, 'model_size_bytes': 1})\n")
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "forger", "labels": {c.LABEL_JOB_UID: job_uid, c.LABEL_UNIT: "trial-0",
                                                      c.LABEL_MANAGED_BY: c.MANAGED_BY}},
            "spec": {"restartPolicy": "Never", "containers": [{
                "name": "runner", "image": "python", "command": [sys.executable, "-c", script],
                "env": [{"name": "QTUNE_RESULT_SECRET", "value": ""}]}]}}


def test_forged_results_for_a_running_trial_are_ignored(cluster: Any, op_namespace: str, workspace: Path,
                                                        start_operator: Any) -> None:
    from qtune.protocol import TrialResult
    from qtune.runner.metrics import push_result

    ns, name = op_namespace, "forged"
    operator = start_operator([ns])
    manifest = latency_manifest(name, 1)
    manifest["spec"]["tuning"].update(maxTrials=1, minSpeedup=1.0)
    # a slower trial: a wide window in which its pod runs
    manifest["spec"]["benchmark"].update(maxSeconds=8, minRounds=20, targetPrecision=0.001)
    opcluster.create_job(cluster, ns, manifest)
    uid = opcluster.get_job(cluster, ns, name)["metadata"]["uid"]
    core = client.CoreV1Api(cluster.api_client())
    pod_name = c.unit_pod(name, "trial-0")

    def trial_running() -> bool:
        try:
            return core.read_namespaced_pod(pod_name, ns).status.phase == "Running"
        except client.ApiException:
            return False

    wait_for(trial_running, 240, "trial 0's pod running", interval=0.2)
    forged = TrialResult(trial=0, status="succeeded", accuracy=0.999, model_size_bytes=1, speed={"16": {
        "batch_size": 16, "p50_ms": 0.001, "p90_ms": 0.001, "fp32_p50_ms": 1.0, "fp32_p90_ms": 1.0,
        "speedup": 1000.0, "low": 999.0, "high": 1001.0}})
    # 1. a direct HTTP push, signed with a guessed secret
    push_result(cluster.pushgateway_url, uid, "trial-0", forged, secret="guessed")
    wait_for(lambda: _events(cluster, ns, "ResultRejected"), 30, "the wrongly signed result rejected")
    assert trial_running(), "the trial pod finished before the forged push was judged: widen the window"
    # 2. another pod of the namespace, carrying the job's labels, pushes an unsigned result
    core.create_namespaced_pod(ns, _forger_pod(ns, cluster.pushgateway_url, uid))
    forger = cluster.wait_for_pod(ns, "forger", timeout=60)
    assert forger.status.phase == "Succeeded", cluster.pod_log(ns, "forger")
    # 3. a plain HTTP push of the text format (what curl would send), no signature at all
    from prometheus_client import generate_latest

    from qtune.runner.metrics import result_registry

    forged.accuracy = 0.998  # a new result, reported anew
    body = generate_latest(result_registry(forged, None))
    request = urllib.request.Request(f"{cluster.pushgateway_url}/metrics/job/qtune_result/job_uid/{uid}/unit/trial-0",
                                     data=body, method="PUT")
    urllib.request.urlopen(request, timeout=5).close()
    # 4. a sibling group: the victim's grouping labels plus one more (issue 20). Prometheus would merge it into
    # the genuine result by (job_uid, unit); it is refused alone, and deleted with the job's groups. Its series is
    # of a family of its own (the Pushgateway refuses, 400, a series of the result's families with other labels).
    sibling = urllib.request.Request(f"{cluster.pushgateway_url}/metrics/job/qtune_result/job_uid/{uid}/unit/"
                                     "trial-0/x/1", data=b"qtune_result_poison 0.5\n", method="PUT")
    urllib.request.urlopen(sibling, timeout=5).close()
    wait_for(lambda: opcluster.job_status(cluster, ns, name).get("rejectedResults", 0) >= 2, 30,
             "the forged results counted in status.rejectedResults",
             detail=lambda: repr(opcluster.job_status(cluster, ns, name).get("rejectedResults")))

    status = _wait(cluster, ns, name, lambda st: st.get("state") in TERMINAL, 300, "the job finished")
    assert status["state"] == "Succeeded", status
    wait_for(lambda: opcluster.pushgateway_groups(cluster, uid) == [], 30, "every group of the job deleted, "
             "the sibling too", detail=lambda: repr(opcluster.pushgateway_groups(cluster, uid)))
    history = opcluster.job_history(cluster, ns, name)
    trial = history.trials[0]
    sys.stderr.write(f"forged: rejected {status.get('rejectedResults')}, recorded trial 0: accuracy "
                     f"{trial.accuracy}, speed@16 {_speed(trial)}, size {trial.model_size_bytes}\n")
    assert trial.status == "succeeded" and trial.accuracy not in (0.999, 0.998) and trial.accuracy > 0.9
    assert trial.model_size_bytes > 1000
    assert trial.speed["16"].p50_ms > 0.001 and trial.speed["16"].speedup < 100
    assert status["best"]["accuracy"] != 0.999 and status["rejectedResults"] >= 2
    messages = " ".join(e.message for e in _events(cluster, ns, "ResultRejected"))
    assert "trial-0" in messages
    metrics = operator.metrics()
    rejected = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                   if line.startswith("qtune_operator_results_rejected_total{"))
    assert rejected >= 2, [line for line in metrics.splitlines() if "rejected" in line]


# ------------------------------------------------------------------------------------------------
# a model of 2,000 quantizable ops
# ------------------------------------------------------------------------------------------------


def test_a_2000_op_model_trial_pod_starts_and_reports(cluster: Any, op_namespace: str, workspace: Path,
                                                      start_operator: Any) -> None:
    ns, name = op_namespace, "chain"
    paths = chainmodel.build(workspace)
    start_operator([ns])
    manifest = {"apiVersion": f"{opcluster.GROUP}/{opcluster.VERSION}", "kind": "QuantizationJob",
                "metadata": {"name": name}, "spec": chainmodel.job_spec(paths, opcluster.CLAIM)}
    started = time.monotonic()
    opcluster.create_job(cluster, ns, copy.deepcopy(manifest))
    core = client.CoreV1Api(cluster.api_client())
    pod_name = c.unit_pod(name, "trial-0")

    def trial_pod() -> Any:
        try:
            return core.read_namespaced_pod(pod_name, ns)
        except client.ApiException:
            return None

    wait_for(lambda: trial_pod() is not None or opcluster.job_status(cluster, ns, name).get("state") in TERMINAL, 600,
             "trial 0's pod created", detail=lambda: json.dumps(opcluster.job_status(cluster, ns, name))[:2000])
    pod = trial_pod()
    assert pod is not None, opcluster.job_status(cluster, ns, name)
    argv = pod.spec.containers[0].command + pod.spec.containers[0].args
    assert max(len(a) for a in argv) < 4096, "the tune config travelled as argv"
    inputs = core.read_namespaced_config_map(c.unit_inputs(pod_name), ns)
    config = json.loads(inputs.data[c.CONFIG_FILE])
    config_bytes = len(inputs.data[c.CONFIG_FILE].encode())
    assert config_bytes > 128 * 1024, "the config should exceed one argument's limit (that is the point)"

    status = _wait(cluster, ns, name, lambda st: st.get("state") in TERMINAL, 600, "the job finished")
    seconds = time.monotonic() - started
    history = opcluster.job_history(cluster, ns, name)
    trial = history.trials[0]
    sys.stderr.write(f"2,000 ops: config {config_bytes} bytes, job {status.get('state')}/{status.get('reason')} in "
                     f"{seconds:.0f}s, trial 0 {trial.status} mse {trial.accuracy} size {trial.model_size_bytes}\n")
    assert status["state"] == "Succeeded", status
    assert trial.status == "succeeded" and codec.dump(trial.tune_config) == config
    assert len(history.trials) == 1 and trial.accuracy is not None and trial.model_size_bytes
    assert status["trials"]["succeeded"] == 1


# ------------------------------------------------------------------------------------------------
# user code beside the job file: a metric module of the example, imported in the pods
# ------------------------------------------------------------------------------------------------
DIGIT_STRINGS = opcluster.ROOT / "examples" / "digit_strings"


def test_a_user_metric_beside_the_job_runs_in_the_pods(cluster: Any, op_namespace: str, workspace: Path,
                                                        start_operator: Any) -> None:
    """examples/digit_strings on the cluster: string labels scored by `sequence_metrics:ExactMatch`, a
    module the job's folder (here the workspace volume) holds; no image change, no PYTHONPATH."""
    files = ("model.onnx", "calib.npz", "eval.npz", "sequence_metrics.py")
    if not all((DIGIT_STRINGS / name).is_file() for name in files):
        import subprocess

        subprocess.run([sys.executable, str(DIGIT_STRINGS / "build.py")], check=True, timeout=900)
    folder = workspace / "digit_strings"
    folder.mkdir()
    for name in files:
        shutil.copy2(DIGIT_STRINGS / name, folder / name)
    manifest = yaml.safe_load((DIGIT_STRINGS / "job.yaml").read_text())
    spec = manifest["spec"]
    for section, key in (("model", None), ("calibration", "data"), ("evaluation", "data")):
        node = spec[section] if key is None else spec[key][section]
        node["path"] = f"digit_strings/{node['path']}"
    spec["data"]["evaluation"]["metric"] = "digit_strings.sequence_metrics:ExactMatch"
    spec["tuning"].update(maxTrials=2, parallelTrials=1)
    spec["benchmark"] = {"batchSizes": [1, 16], "warmupRuns": 2, "runs": 5, "maxSeconds": 3, "minRounds": 3,
                         "threads": 1}
    spec["trial"] = {"resources": {"cpu": 1, "memory": "2Gi"}}
    spec["workspace"] = {"persistentVolumeClaim": opcluster.CLAIM}
    name = manifest["metadata"]["name"]
    start_operator([op_namespace])
    opcluster.create_job(cluster, op_namespace, manifest)
    status = _wait(cluster, op_namespace, name, lambda st: st.get("state") in TERMINAL, 420, "the job finished")
    assert status.get("reason") in ("GoalReached", "NoSpeedup", "MaxTrialsReached", "SearchExhausted"), \
        status.get("message")
    assert status["baseline"]["metric"] == "digit_strings.sequence_metrics:ExactMatch"
    assert 0.9 <= status["baseline"]["accuracy"] <= 1.0  # exact match of 4-digit strings, fp32 ~0.96
    history = opcluster.job_history(cluster, op_namespace, name)
    assert history.baseline.metric == "digit_strings.sequence_metrics:ExactMatch"
    assert all(t.status == "succeeded" for t in history.trials), [(t.reason, t.message) for t in history.trials]
    assert status["best"]["accuracy"] >= 0.98 * status["baseline"]["accuracy"]
