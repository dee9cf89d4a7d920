"""Scale benchmark of the QuantizationJob operator on the test control plane (a benchmark, not a test).

Many jobs at once (objective latency, so each ends with a `confirm` unit). Their pods run this
file's `fake-runner`: the REAL runner (`qtune.runner.__main__.main`: argument parsing, the job
and tune config read from the unit's mounted inputs (its pod's annotations), publishing the baseline's tuning space to
its ConfigMap, signing with the pod's secret, pushing with retry, the termination message) with
only the ONNX Runtime work (`run_baseline`, `run_trial`, `run_confirm`) replaced by made-up
figures. What is measured is the operator, not ONNX Runtime; and a protocol change breaks it.

    python benchmarks/operator_fanout.py [--jobs 20] [--trials 10] [--parallel 2]
    python benchmarks/operator_fanout.py --existing   # the plane of $KUBECONFIG / QTUNE_* env
                                                      # (API counts need `plane.py up --audit`)

Prints: every trial recorded exactly once (each job's history ConfigMap against the pods the
operator created; exit 1 on any violation), result -> next pod latency p50/p90, the operator's
peak RSS, API requests per trial made by the operator (the plane's audit log of the operator's
own user), job states, elapsed time, pods/s and the load average; and how each was measured.

Without --existing it starts a plane (tests/cluster/plane.py, with audit, its nodes 1000 CPUs
each (--node-cpus) so that the scheduler never makes a job wait: fake pods use next to no CPU) in a folder under
/var/tmp (the node agent's /tmp emptyDir mounts hide state folders that live under /tmp).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = f"qtune-bench-{os.getpid()}"
CLAIM = "qtune-work"
QUEUE = "bench"  # the LocalQueue of --kueue
SIGNING_KEY = "operator-fanout-benchmark-key"
OP_TYPES = ("Conv", "MatMul", "Gemm", "Add", "Mul")
MAX_TRIALS = 3 ** len(OP_TYPES)
"""Exhaustive configs of the fake space: per op type two quantized settings or fp32."""
POLL_SECONDS = 0.1
"""Period of the benchmark's Prometheus poller (a result is 'seen' at most this late)."""

# --------------------------------------------------------------------------------------------
# the fake runner: qtune.runner's own main, with the ONNX Runtime work replaced
# --------------------------------------------------------------------------------------------


def fake_space() -> Any:
    """One op per type, each with two activation calibration algorithms: 3^5 exhaustive configs."""
    from qtune.tuning.space import OpSpace, TuningSpace

    act = {"dtype": ["uint8", "fp32"], "scheme": ["asym"], "granularity": ["per_tensor"],
           "algorithm": ["minmax", "percentile"]}
    weight = {"dtype": ["int8", "fp32"], "scheme": ["sym"], "granularity": ["per_channel"], "algorithm": ["minmax"]}
    ops = {f"op{i}": OpSpace(f"op{i}", op_type, dict(act), dict(weight), ["static"])
           for i, op_type in enumerate(OP_TYPES)}
    return TuningSpace(ops=ops, approaches=["static"], format="QDQ", calibration_sampling_size=100)


def _speed(context: Any, speedup: float) -> dict[str, Any]:
    from qtune.protocol import SpeedMeasurement

    return {str(b): SpeedMeasurement(batch_size=b, p50_ms=float(b) / speedup, p90_ms=1.1 * b / speedup,
                                     fp32_p50_ms=float(b), fp32_p90_ms=1.1 * b, speedup=speedup,
                                     low=speedup - 0.05, high=speedup + 0.05, rounds=5, runs_per_window=1,
                                     threads=1, seconds=0.01)
            for b in context.spec.benchmark.batch_sizes}


def fake_run_baseline(context: Any) -> tuple[Any, Any]:
    """What qtune.runner.baseline.run_baseline leaves behind, without a model: space.json, baseline.json."""

    from qtune.runner.context import BASELINE_FILE, SPACE_FILE
    from qtune.tuning import codec
    from qtune.tuning.history import Baseline, write_json_atomic

    space = fake_space()
    sizes = context.spec.benchmark.batch_sizes
    baseline = Baseline(accuracy=0.9, latency_ms={str(b): float(b) for b in sizes},
                        latency_p90_ms={str(b): 1.1 * b for b in sizes}, model_size_bytes=1_000_000, seconds=0.01,
                        metric="top1")
    write_json_atomic(context.workspace / SPACE_FILE, codec.dump(space))
    write_json_atomic(context.workspace / BASELINE_FILE, codec.dump(baseline))
    return space, baseline


def fake_run_trial(context: Any, config: Any, index: int, early_stopping: bool = True) -> Any:
    """A passing trial whose speedup grows with the number of quantized ops; it first sleeps
    $QTUNE_BENCH_TRIAL_SECONDS (0: none; kueue_fair_share.py's trials hold their quota that long)."""
    from qtune.protocol import SUCCEEDED, TrialResult

    time.sleep(float(os.environ.get("QTUNE_BENCH_TRIAL_SECONDS") or 0))
    quantized = len(config.quantized_ops())
    return TrialResult(trial=index, status=SUCCEEDED, config_key=config.key(), accuracy=0.9,
                       speed=_speed(context, 1.2 + 0.1 * quantized),
                       model_size_bytes=1_000_000 - 100_000 * quantized, timings={"total": 0.01})


def fake_run_confirm(context: Any, candidates: dict[str, dict[str, Any]]) -> Any:
    from qtune.protocol import SUCCEEDED, ConfirmResult
    from qtune.tuning import codec
    from qtune.tuning.config import TuneConfig

    speed = {index: _speed(context, 1.2 + 0.1 * len(codec.load(TuneConfig, config).quantized_ops()))
             for index, config in candidates.items()}
    return ConfirmResult(status=SUCCEEDED, candidates=sorted(int(i) for i in candidates), speed=speed, seconds=0.01)


def fake_runner(argv: list[str]) -> int:
    """`python -m qtune.runner ...` exactly, except the three functions doing ONNX Runtime work."""
    nice = int(os.environ.get("QTUNE_BENCH_POD_NICE", "0"))
    if nice:
        os.nice(nice)  # pods stand for other machines: here they yield the shared cores to the operator
    import qtune.runner.__main__ as runner
    import qtune.runner.baseline
    import qtune.runner.confirm
    import qtune.runner.trial

    qtune.runner.baseline.run_baseline = fake_run_baseline  # type: ignore[assignment]
    qtune.runner.trial.run_trial = fake_run_trial  # type: ignore[assignment]
    qtune.runner.confirm.run_confirm = fake_run_confirm  # type: ignore[assignment]
    return runner.main(argv)


# --------------------------------------------------------------------------------------------
# what the benchmark checks and measures (pure functions)
# --------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class PodSeen:
    """A unit pod the operator created: its job's uid, unit, attempt and creation time."""

    name: str
    job_uid: str
    unit: str
    attempt: int
    created: float


def dispatch_pairs(results: dict[tuple[str, str], float], pods: Iterable[PodSeen],
                   slack: float = POLL_SECONDS) -> list[tuple[tuple[str, str], float, PodSeen]]:
    """Per job, each first-attempt pod created after a trial result paired with the result that
    let it start: a trial pod with the earliest unpaired result (first in, first out), the
    confirm pod with the latest (it waits for all). Pods without an earlier result (the first
    ones, after the baseline), retries and other units (cleanup) are left out. `slack`: a result counts as earlier
    when seen at most this long after the pod (the poller sees results up to a period late).
    Returns ((job uid, result unit), result seen, pod) triples."""
    from qtune.protocol import UnitKind, unit_trial_index

    by_job: dict[str, list[tuple[float, str]]] = {}
    for (uid, unit), seen in results.items():
        if unit_trial_index(unit) is not None:
            by_job.setdefault(uid, []).append((seen, unit))
    out: list[tuple[tuple[str, str], float, PodSeen]] = []
    for pod in sorted(pods, key=lambda p: p.created):
        waiting = by_job.get(pod.job_uid)
        if pod.attempt or not waiting or (pod.unit != UnitKind.CONFIRM and unit_trial_index(pod.unit) is None):
            continue  # a retry, or no trial result of the job yet, or not a trial/confirm pod (baseline, cleanup)
        waiting.sort()
        earlier = [item for item in waiting if item[0] <= pod.created + slack]
        if not earlier:
            continue
        seen, unit = earlier[-1] if pod.unit == UnitKind.CONFIRM else earlier[0]
        out.append(((pod.job_uid, unit), seen, pod))
        if pod.unit == UnitKind.CONFIRM:
            del waiting[:len(earlier)]
        else:
            waiting.remove(earlier[0])
    return out


def dispatch_latencies(results: dict[tuple[str, str], float], pods: Iterable[PodSeen],
                       slack: float = POLL_SECONDS) -> list[float]:
    """Result first queryable -> the next pod created (see dispatch_pairs)."""
    return [pod.created - seen for _, seen, pod in dispatch_pairs(results, pods, slack)]


@dataclass
class JobCheck:
    """One job's history against the pods created for it."""

    name: str
    recorded: int
    violations: list[str]
    retries: dict[int, int]
    """trial index -> pods created for it, where more than one."""


def check_job(name: str, state: str | None, history: Any, expected: int, pods: Iterable[PodSeen],
              confirm: bool) -> JobCheck:
    """Trial indices 0..expected-1 each recorded once, succeeded, each with a pod (one unless retried);
    the baseline recorded, the confirmation too when the job has one; the job Succeeded."""
    from qtune.protocol import SUCCEEDED, unit_trial_index

    violations: list[str] = []
    if state != "Succeeded":
        violations.append(f"state {state}")
    if history is None:
        return JobCheck(name, 0, [*violations, "no history ConfigMap"], {})
    indices = [t.index for t in history.trials]
    counts = Counter(indices)
    if dupes := sorted(i for i, n in counts.items() if n > 1):
        violations.append(f"trials recorded more than once: {dupes}")
    if sorted(counts) != list(range(expected)):
        missing = sorted(set(range(expected)) - set(counts))
        extra = sorted(set(counts) - set(range(expected)))
        violations.append(f"{len(counts)} trials recorded, {expected} expected (missing {missing}, extra {extra})")
    if bad := [f"{t.index}:{t.status}({t.reason})" for t in history.trials if t.status != SUCCEEDED]:
        violations.append(f"trials not succeeded: {', '.join(bad)}")
    if history.baseline is None:
        violations.append("no baseline recorded")
    if confirm and (history.confirmation is None or history.confirmation.status != SUCCEEDED):
        violations.append(f"confirmation not recorded as succeeded: {history.confirmation}")
    per_trial = Counter(unit_trial_index(p.unit) for p in pods if unit_trial_index(p.unit) is not None)
    if without := sorted(set(counts) - set(per_trial)):
        violations.append(f"trials recorded without a pod: {without}")
    if unrecorded := sorted(set(per_trial) - set(counts)):
        violations.append(f"trial pods whose trial is not recorded: {unrecorded}")
    retries = {i: n for i, n in per_trial.items() if n > 1 and i is not None}
    return JobCheck(name, len(counts), violations, retries)


def _timestamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def read_audit(lines: Iterable[str], user: str, since: float = 0.0) -> dict[str, dict[str, Any]]:
    """The requests of `user` received at or after `since`: auditID -> its last event."""
    requests: dict[str, dict[str, Any]] = {}
    for line in lines:
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line being written
        if (event.get("user") or {}).get("username") != user:
            continue
        if _timestamp(event["requestReceivedTimestamp"]) < since:
            continue
        requests[event["auditID"]] = event
    return requests


def request_kind(event: dict[str, Any]) -> tuple[str, str]:
    """(verb, resource[/subresource]) of an audit event; "(non-resource)" for discovery, /version, ..."""
    ref = event.get("objectRef")
    if not ref:
        return event.get("verb", "?"), "(non-resource)"
    resource = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
    return event.get("verb", "?"), resource


def created_pods(requests: dict[str, dict[str, Any]], namespace: str) -> dict[str, float]:
    """Pod name -> when the apiserver completed its create (201) in `namespace`."""
    out: dict[str, float] = {}
    for event in requests.values():
        ref = event.get("objectRef") or {}
        if (event.get("verb") == "create" and ref.get("resource") == "pods" and not ref.get("subresource")
                and ref.get("namespace") == namespace and (event.get("responseStatus") or {}).get("code") == 201
                and event.get("stage") == "ResponseComplete"):
            out[ref.get("name", "")] = _timestamp(event["stageTimestamp"])
    return out


@dataclass
class StepTiming:
    """The operator's share of one dispatch (its job's pod seen finished -> next pod created), split by the
    audit log into: before its first request, inside the API server (the time the job's requests in the window
    cover, received -> completed: requests made at once count once) and in the operator between its requests."""

    wake: float
    api: float
    between: float
    requests: int


def _covered(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by the sorted spans (their union)."""
    total, reach = 0.0, float("-inf")
    for begin, end in spans:
        if end > reach:
            total += end - max(begin, reach)
            reach = end
    return total


def operator_split(requests: dict[str, dict[str, Any]], windows: Iterable[tuple[str, float, float]]
                   ) -> list[StepTiming]:
    """`windows`: (job name, start, end = the next pod's create completed). A request belongs to a job when
    the object it names is the job or one of its objects (`<job>` or `<job>-...`)."""
    by_job: dict[str, list[tuple[float, float]]] = {}
    for event in requests.values():
        name = (event.get("objectRef") or {}).get("name") or ""
        if event.get("stage") != "ResponseComplete" or not name or event.get("verb") == "watch":
            continue
        span = (_timestamp(event["requestReceivedTimestamp"]), _timestamp(event["stageTimestamp"]))
        by_job.setdefault(name, []).append(span)
    out = []
    for job_name, start, end in windows:
        spans = sorted(span for name, items in by_job.items()
                       if name == job_name or name.startswith(f"{job_name}-") for span in items
                       if start <= span[0] and span[1] <= end + 1e-3)
        if not spans:
            continue
        api = _covered(spans)
        wake = spans[0][0] - start
        out.append(StepTiming(wake, api, max(0.0, end - start - wake - api), len(spans)))
    return out


# --------------------------------------------------------------------------------------------
# observation from outside the operator
# --------------------------------------------------------------------------------------------


class Observer:
    """A pod watch (unit pods: first seen) and a 10 Hz Prometheus poller (results: first queryable)."""

    def __init__(self, core: Any, prometheus: str) -> None:
        self.core = core
        self.prometheus = prometheus
        self.pods: dict[str, PodSeen] = {}
        self.finished: dict[tuple[str, str], float] = {}
        """(job uid, unit) -> when the watch first saw its pod Succeeded or Failed."""
        self.relisted = 0
        self.admitted: dict[str, float] = {}
        """pod name -> when the watch first saw it without Kueue's scheduling gate (at creation without Kueue)."""
        self.result_seen: dict[tuple[str, str], float] = {}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._watch, daemon=True),
                        threading.Thread(target=self._poll, daemon=True)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _add(self, pod: Any, when: float) -> None:
        labels = pod.metadata.labels or {}
        if pod.metadata.name in self.pods or "qtune.io/unit" not in labels:
            return
        self.pods[pod.metadata.name] = PodSeen(pod.metadata.name, labels.get("qtune.io/job-uid", ""),
                                               labels["qtune.io/unit"], int(labels.get("qtune.io/attempt", 0)),
                                               when)

    def _admitted(self, pod: Any, when: float) -> None:
        gates = [g.name for g in (pod.spec.scheduling_gates or [])] if pod.spec else []
        if "kueue.x-k8s.io/admission" not in gates:
            self.admitted.setdefault(pod.metadata.name, when)

    def _finished(self, pod: Any, when: float) -> None:
        labels = pod.metadata.labels or {}
        if pod.status and pod.status.phase in ("Succeeded", "Failed") and "qtune.io/unit" in labels:
            self.finished.setdefault((labels.get("qtune.io/job-uid", ""), labels["qtune.io/unit"]), when)

    def _watch(self) -> None:
        from kubernetes import watch

        while not self.stop.is_set():
            try:
                listed = self.core.list_namespaced_pod(NAMESPACE, label_selector="qtune.io/unit")
                for pod in listed.items:  # missed while not watching: creationTimestamp (1 s resolution)
                    if pod.metadata.name not in self.pods:
                        self.relisted += 1
                    self._add(pod, pod.metadata.creation_timestamp.timestamp())
                stream = watch.Watch()
                for event in stream.stream(self.core.list_namespaced_pod, NAMESPACE, label_selector="qtune.io/unit",
                                           resource_version=listed.metadata.resource_version):
                    if event["type"] == "ADDED":
                        self._add(event["object"], time.time())
                    self._admitted(event["object"], time.time())
                    self._finished(event["object"], time.time())
                    if self.stop.is_set():
                        stream.stop()
            except Exception:  # noqa: BLE001 - e.g. 410 Gone, a cut stream: list and watch again
                time.sleep(0.2)

    def _poll(self) -> None:
        from qtune.protocol import INFO_METRIC, PUSH_JOB

        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode(
            {"query": f'{INFO_METRIC}{{job="{PUSH_JOB}"}}'})
        while not self.stop.is_set():
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    data = json.load(response)["data"]["result"]
                now = time.time()
                for sample in data:
                    metric = sample["metric"]
                    self.result_seen.setdefault((metric["job_uid"], metric["unit"]), now)
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(POLL_SECONDS)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stop_operator(operator: subprocess.Popen | None) -> None:
    """SIGTERM the operator process (if it still runs), SIGKILL after 20 s."""
    if operator is not None and operator.poll() is None:
        os.kill(operator.pid, signal.SIGTERM)
        try:
            operator.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(operator.pid, signal.SIGKILL)


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg()) + f" (1/5/15 min) on {os.cpu_count()} CPUs"


def job(name: str, trials: int, parallel: int, queue: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "qtune.io/v1alpha1", "kind": "QuantizationJob", "metadata": {"name": name},
        "spec": {
            "model": {"framework": "onnxruntime", "path": "model.onnx"},
            "data": {"calibration": {"path": "calib.npz"}, "evaluation": {"path": "eval.npz"}},
            "tuning": {"strategy": "exhaustive", "objective": "latency", "maxTrials": trials,
                       "parallelTrials": parallel},
            "trial": {"resources": {"cpu": 1, "memory": "256Mi"}},
            "workspace": {"persistentVolumeClaim": CLAIM},
        },
    }
    if queue:
        body["spec"]["trial"]["queueName"] = queue
    return body


def operator_settings(env: dict[str, str], words: tuple[str, ...] = ("poll", "deadline", "timeout", "interval")
                      ) -> list[str]:
    """The operator's polling and waiting settings as it will read them from `env` (name=value, * when set by
    env): the figures depend on them, and their defaults change."""
    from dataclasses import MISSING, fields

    from qtune.operator.config import OperatorConfig

    out = []
    for item in fields(OperatorConfig):
        if not any(word in item.name for word in words):
            continue
        name = OperatorConfig.env_name(item.name)
        text = env.get(name) if name else None
        value = item.metadata["parse"](text) if text else (item.default if item.default is not MISSING else None)
        out.append(f"{item.name}={value}{'*' if text else ''}")
    return out


def _metric_lines(text: str, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fake-runner":
        return fake_runner(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--trials", type=int, default=10, help=f"maxTrials of each job (at most {MAX_TRIALS})")
    parser.add_argument("--parallel", type=int, default=2, help="parallelTrials of each job")
    parser.add_argument("--existing", action="store_true", help="use the plane of the environment")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for every job to end")
    parser.add_argument("--pod-nice", type=int, default=0,
                        help="niceness of the pods' processes (e.g. 19: on a real cluster pods run on other machines "
                             "than the operator; on this one they share its cores)")
    parser.add_argument("--node-cpus", type=int, default=1000,
                        help="CPUs of each plane node (fake pods use next to no CPU; 8, the plane's default, makes "
                             "pods of many jobs wait for the scheduler)")
    parser.add_argument("--kueue", action="store_true",
                        help="queue every unit pod in Kueue (issue 21): the plane runs Kueue (Plane(kueue=True)), the "
                             "namespace a LocalQueue whose ClusterQueue's quota never binds, the jobs "
                             "spec.trial.queueName: what Kueue's admission adds to result -> next pod")
    parser.add_argument("--operator-log-level", default="INFO", help="the operator's --log-level (its log: a file "
                                                                      "under the temp folder, printed at the end)")
    args = parser.parse_args(argv)
    if not 1 <= args.trials <= MAX_TRIALS:
        parser.error(f"--trials: {args.trials} is not allowed: 1..{MAX_TRIALS} (the fake space's exhaustive configs)")
    if not 1 <= args.parallel <= args.trials:
        parser.error(f"--parallel: {args.parallel} is not allowed: 1..--trials ({args.trials})")

    sys.path.insert(0, str(ROOT / "tests" / "cluster"))
    sys.path.insert(0, str(ROOT / "tests" / "cluster" / "operator"))
    import plane as plane_mod

    plane = None
    if args.existing:
        admin_kubeconfig, prometheus = os.environ["KUBECONFIG"], os.environ["QTUNE_PROMETHEUS_URL"]
        pushgateway = os.environ["QTUNE_PUSHGATEWAY_URL"]
        state = Path(os.environ.get("QTUNE_PLANE_STATE_DIR", "/nonexistent"))
        audit_log, operator_kubeconfig = state / "audit" / "audit.log", state / "operator.kubeconfig"
        if not (audit_log.exists() and operator_kubeconfig.exists()):
            audit_log, operator_kubeconfig = None, Path(admin_kubeconfig)
    else:
        state = Path(tempfile.mkdtemp(prefix="qtune-bench-plane-", dir="/var/tmp"))
        # fake pods use next to no CPU: by default nodes large enough that the scheduler never makes jobs wait
        nodes = tuple(replace(n, cpu=str(args.node_cpus), memory=f"{max(32, args.node_cpus)}Gi", pods="2000")
                      for n in plane_mod.NODES)
        plane = plane_mod.Plane(state_dir=state, audit=True, nodes=nodes, kueue=args.kueue).start()
        admin_kubeconfig, prometheus, pushgateway = str(plane.kubeconfig), plane.prometheus_url, plane.pushgateway_url
        audit_log, operator_kubeconfig = plane.audit_log, plane.operator_kubeconfig
    import opcluster
    from kubernetes import client, config

    from qtune.operator.constants import history_configmap
    from qtune.operator.store import decode_history

    api = config.new_client_from_config(config_file=admin_kubeconfig)
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    operator = None
    try:
        opcluster.install_crds(api)
        core.create_namespace({"metadata": {"name": NAMESPACE}})
        for _ in range(100):  # the namespace's default ServiceAccount
            try:
                core.read_namespaced_service_account("default", NAMESPACE)
                break
            except client.ApiException:
                time.sleep(0.2)
        if args.kueue:  # one LocalQueue; a quota far above what the fake pods ask: only admission is measured
            import kueue as kueue_mod

            kueue_mod.create_queues(api, NAMESPACE, {"cpu": "100000", "memory": "100000Gi",
                                                     "ephemeral-storage": "100000Gi"}, QUEUE)
        core.create_namespaced_persistent_volume_claim(NAMESPACE, {
            "metadata": {"name": CLAIM, "labels": dict(opcluster.WORKSPACE_LABELS)},  # opted in as a workspace
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}})

        # the operator's settings are its defaults (qtune/operator/config.py) except where it runs
        env = {**os.environ, "KUBECONFIG": str(operator_kubeconfig), "QTUNE_PROMETHEUS_URL": prometheus,
               "QTUNE_PUSHGATEWAY_URL": pushgateway, "QTUNE_SIGNING_KEY": SIGNING_KEY,
               "QTUNE_RUNNER_COMMAND": f"{sys.executable} {Path(__file__).resolve()} fake-runner",
               "QTUNE_POD_ENV": json.dumps({"QTUNE_BENCH_POD_NICE": str(args.pod_nice)})}
        log_path = Path(tempfile.gettempdir()) / f"qtune-bench-operator-{os.getpid()}.log"
        metrics_port, health_port = opcluster.free_port(), opcluster.free_port()
        operator_started = time.time()
        with open(log_path, "wb") as log:
            operator = subprocess.Popen([sys.executable, "-m", "qtune.operator.main", "-n", NAMESPACE,
                                         "--metrics-port", str(metrics_port), "--health-port", str(health_port),
                                         "--log-level", args.operator_log_level],
                                        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=2):
                    break
            except OSError:
                if operator.poll() is not None:
                    raise RuntimeError(f"the operator exited with {operator.returncode}; log: {log_path}") from None
                time.sleep(0.2)
        observer = Observer(core, prometheus)
        observer.start()
        load_before = loadavg()
        settings = operator_settings(env)
        print(f"operator_fanout: {args.jobs} jobs x {args.trials} trials ({args.parallel} at once, objective "
              "latency: baseline, trials, confirm); pods run the real runner with FAKE ONNX Runtime work")
        print(f"  load average at start: {load_before}")
        print("  operator settings (qtune/operator/config.py; env overrides marked *): " + ", ".join(settings))
        started = time.time()
        names = [f"bench-{i:03d}" for i in range(args.jobs)]
        for name in names:
            custom.create_namespaced_custom_object("qtune.io", "v1alpha1", NAMESPACE, "quantizationjobs",
                                                   job(name, args.trials, args.parallel, QUEUE if args.kueue else None))
        done: dict[str, dict[str, Any]] = {}
        uids: dict[str, str] = {}
        last_report = started
        while len(done) < len(names) and time.time() - started < args.timeout:
            if operator.poll() is not None:
                print(f"  the operator exited with {operator.returncode}; log: {log_path}")
                break
            for item in custom.list_namespaced_custom_object("qtune.io", "v1alpha1", NAMESPACE,
                                                             "quantizationjobs")["items"]:
                uids[item["metadata"]["name"]] = item["metadata"]["uid"]
                status = item.get("status") or {}
                if status.get("state") in ("Succeeded", "Failed"):
                    done[item["metadata"]["name"]] = status
            if time.time() - last_report > 30:
                last_report = time.time()
                print(f"  ... {len(done)}/{len(names)} jobs ended after {last_report - started:.0f}s, "
                      f"{len(observer.pods)} pods so far, load {os.getloadavg()[0]:.1f}", flush=True)
            time.sleep(1)
        elapsed = time.time() - started
        time.sleep(1.5)  # the watch catches up
        observer.stop.set()
        alive = operator.poll() is None
        rss = peak_rss_mib(operator.pid) if alive else float("nan")
        cpu = cpu_seconds(operator.pid) if alive else float("nan")
        own = ""
        if alive:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
                own = response.read().decode()
        load_after = loadavg()
        warnings: Counter[str] = Counter()  # the operator's Warning Events: why a unit started again, ...
        examples: dict[str, str] = {}
        for event in core.list_namespaced_event(NAMESPACE).items:
            if event.type == "Warning":
                warnings[event.reason] += event.count or 1
                examples.setdefault(event.reason, f"{event.involved_object.name}: {event.message}"[:300])

        # --- what the operator did through the API server (its own user's audit events)
        requests: dict[str, dict[str, Any]] = {}
        if audit_log is not None and audit_log.exists():
            with open(audit_log, errors="replace") as lines:
                requests = read_audit(lines, plane_mod.OPERATOR_USER, since=operator_started - 1)
        audit_created = created_pods(requests, NAMESPACE)
        pods = list(observer.pods.values())
        if audit_created:  # the apiserver's completion time of each create (microseconds) beats the watch's
            pods = [PodSeen(p.name, p.job_uid, p.unit, p.attempt, audit_created.get(p.name, p.created)) for p in pods]

        # --- every trial recorded exactly once
        checks: list[JobCheck] = []
        by_uid: dict[str, list[PodSeen]] = {}
        for pod in pods:
            by_uid.setdefault(pod.job_uid, []).append(pod)
        for name in names:
            history = None
            try:
                body = api.sanitize_for_serialization(core.read_namespaced_config_map(history_configmap(name),
                                                                                      NAMESPACE))
                history = decode_history(body)
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
            checks.append(check_job(name, (done.get(name) or {}).get("state"), history, args.trials,
                                    by_uid.get(uids.get(name, ""), []), confirm=True))
        violations = [(c.name, v) for c in checks for v in c.violations]
        retries = {c.name: c.retries for c in checks if c.retries}
        recorded = sum(c.recorded for c in checks)
        trial_pods = sum(1 for p in pods if p.unit.startswith("trial-"))
        pod_kinds = Counter("trial" if p.unit.startswith("trial-") else p.unit for p in pods)
        rejected = _metric_lines(own, "qtune_operator_results_rejected_total")
        rejected_total = sum(rejected.values())

        states = Counter(status.get("state") for status in done.values())
        created = sorted(p.created for p in pods)
        rate = (len(created) - 1) / (created[-1] - created[0]) if len(created) > 1 else float("nan")
        pairs = dispatch_pairs(observer.result_seen, pods)
        latencies = [pod.created - seen for _, seen, pod in pairs]
        # the operator believes a result only once its pod is Succeeded (the node agent reports it)
        reported = [observer.finished[key] - seen for key, seen, _ in pairs if key in observer.finished]
        operator_share = [pod.created - max(seen, observer.finished.get(key, seen)) for key, seen, pod in pairs]
        dispatch = _metric_lines(own, "qtune_operator_dispatch_latency_seconds_")
        own_count = next((v for k, v in dispatch.items() if "_count" in k), 0.0)
        own_sum = next((v for k, v in dispatch.items() if "_sum" in k), 0.0)

        print(f"  jobs: {len(done)}/{len(names)} ended {dict(states)} in {elapsed:.1f}s"
              + ("" if len(done) == len(names) else f" (TIMED OUT after {args.timeout:.0f}s)"))
        print(f"  trials recorded: {recorded} of {args.jobs * args.trials} expected; trial pods created: {trial_pods}; "
              f"unit pods created: {len(pods)} {dict(pod_kinds)}; "
              f"retried trials: {sum(len(r) for r in retries.values())}"
              + (f" {retries}" if retries else ""))
        print(f"  results rejected by the operator: {int(rejected_total)}" + (f" {rejected}" if rejected_total else ""))
        if rejected_total > sum(n - 1 for r in retries.values() for n in r.values()):
            violations.append(("(operator)", f"{int(rejected_total)} results rejected, more than the superseded "
                                             "attempts of retried trials could leave behind"))
        if warnings:
            print(f"  Warning Events in the namespace: {dict(warnings.most_common())}")
            for reason, text in examples.items():
                print(f"    e.g. {reason}: {text}")
        if violations:
            print(f"  VIOLATIONS ({len(violations)}):")
            for name, text in violations[:50]:
                print(f"    {name}: {text}")
        else:
            print("  every trial recorded exactly once, succeeded, each with its pod: OK")
        if created:
            print(f"  unit pods created per second: {rate:.2f} (over {created[-1] - created[0]:.1f}s)")
        print(f"  result -> next unit pod latency, {len(latencies)} samples: p50 {percentile(latencies, 0.5):.3f}s, "
              f"p90 {percentile(latencies, 0.9):.3f}s, max {max(latencies, default=float('nan')):.3f}s"
              + (f", mean {statistics.mean(latencies):.3f}s" if latencies else "") + "  (goal p50 < 1 s)")
        admitted = [observer.admitted[pod.name] - seen for _, seen, pod in pairs if pod.name in observer.admitted]
        admission = [observer.admitted[p.name] - p.created for p in pods if p.name in observer.admitted]
        how = "Kueue removed its scheduling gate" if args.kueue else "no Kueue: ungated when created"
        print(f"  result -> next unit pod admitted ({how}), {len(admitted)} samples: "
              f"p50 {percentile(admitted, 0.5):.3f}s, "
              f"p90 {percentile(admitted, 0.9):.3f}s; pod created -> admitted ({len(admission)} pods): p50 "
              f"{percentile(admission, 0.5):.3f}s, p90 {percentile(admission, 0.9):.3f}s, "
              f"max {max(admission, default=float('nan')):.3f}s")
        print(f"    of which: result queryable -> its pod seen Succeeded (node agent): p50 "
              f"{percentile(reported, 0.5):+.3f}s, p90 {percentile(reported, 0.9):+.3f}s; the later of the two -> "
              f"next pod created (the operator): p50 {percentile(operator_share, 0.5):.3f}s, "
              f"p90 {percentile(operator_share, 0.9):.3f}s")
        job_of = {uid: name for name, uid in uids.items()}
        worst = sorted(pairs, key=lambda item: item[2].created - item[1], reverse=True)[:3]
        if worst:
            print("    slowest: " + "; ".join(
                f"{job_of.get(key[0], '?')} {key[1]} -> {pod.name}: {pod.created - seen:.2f}s (pod seen finished "
                + (f"{observer.finished[key] - seen:+.2f}s)" if key in observer.finished else "never)")
                for key, seen, pod in worst))
        split = operator_split(requests, [(job_of.get(key[0], "?"), max(seen, observer.finished.get(key, seen)),
                                           pod.created) for key, seen, pod in pairs])
        if split:
            print(f"    the operator's share, by the audit log ({len(split)} samples): before its first request p50 "
                  f"{percentile([t.wake for t in split], 0.5):.3f}s p90 {percentile([t.wake for t in split], 0.9):.3f}s"
                  f"; in the API server p50 {percentile([t.api for t in split], 0.5):.3f}s "
                  f"p90 {percentile([t.api for t in split], 0.9):.3f}s; between its requests p50 "
                  f"{percentile([t.between for t in split], 0.5):.3f}s p90 "
                  f"{percentile([t.between for t in split], 0.9):.3f}s; requests per dispatch p50 "
                  f"{percentile([float(t.requests) for t in split], 0.5):.0f}")
        if own_count:
            print(f"  operator's own histogram (result read -> next trial pod created): {int(own_count)} samples, "
                  f"mean {own_sum / own_count:.3f}s")
        print(f"  operator peak RSS (VmHWM): {rss:.1f} MiB (goal < 200 MiB); operator CPU time {cpu:.1f}s over "
              f"{elapsed:.0f}s")
        if requests:
            kinds = Counter(request_kind(e) for e in requests.values())
            watches = sum(n for (verb, _), n in kinds.items() if verb == "watch")
            others = len(requests) - watches
            per = max(recorded, 1)
            print(f"  API requests by the operator: {len(requests)} = {len(requests) / per:.2f} per trial recorded "
                  f"({others / per:.2f} non-watch + {watches / per:.2f} watch; {recorded} trials)")
            by_verb: Counter[str] = Counter()
            for (verb, _), n in kinds.items():
                by_verb[verb] += n
            print("    by verb: " + ", ".join(f"{verb} {n} ({n / per:.2f}/trial)" for verb, n in by_verb.most_common()))
            for (verb, resource), n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])):
                print(f"    {verb:7s} {resource:45s} {n:6d}  {n / per:7.2f}/trial")
            missing = sorted(set(observer.pods) - set(audit_created))
            if missing:
                print(f"  note: {len(missing)} pods seen by the watch have no create by the operator in the audit "
                      f"log: {missing[:5]}")
        else:
            print("  API requests by the operator: not measured (no audit log: start the plane with "
                  "`plane.py up --audit`, or run without --existing)")
        print(f"  load average at end: {load_after}")
        print("  how measured:")
        print(f"    pods: the node agent's processes, niceness {args.pod_nice} (--pod-nice); the operator, plane and "
              "agent at 0")
        print("    jobs/elapsed: from creating the first job to the last job's status.state Succeeded|Failed (listed "
              "every 1 s)")
        print("    trials recorded: each job's history ConfigMap decoded with qtune.operator.store.decode_history; "
              "indices 0..maxTrials-1 once each, status succeeded, baseline and confirmation recorded")
        print("    pods: " + ("the operator's pod creates (201) in the apiserver audit log, cross-checked with a pod "
                              "watch" if audit_created else "a pod watch (unit pods, first seen)")
              + "; a trial with more than one pod is a retry")
        print("    results rejected: the operator's qtune_operator_results_rejected_total (bad signature, no pod, "
              "wrong unit); a violation beyond one per superseded attempt of a retried trial")
        print(f"    latency: a trial result first queryable in Prometheus (the benchmark's own {POLL_SECONDS:g}s "
              "poll of qtune_result_info) -> the job's next unit pod "
              + ("created (the audit log's completion time of its create)" if audit_created else
                 "seen by the pod watch")
              + "; trial pods pair with results first in first out, the confirm pod with the last result; "
              "the split uses the pod watch's first Succeeded event of the result's pod")
        print("    peak RSS: VmHWM of the operator process (/proc/<pid>/status) at the end; CPU: utime+stime")
        print("    API requests: audit events (Metadata level) of the operator's own user "
              f"{plane_mod.OPERATOR_USER}, one per request (auditID), since the operator started, including its "
              "start-up; watch = long-running watch requests, each (re)connection one request")
        print("    pods/s: unit pods created / time from the first to the last creation (all jobs together)")
        print("    load average: os.getloadavg() at start and end (the machine is shared: judge the figures by it)")
        print(f"  operator log: {log_path}")
        ok = len(done) == len(names) and not violations and alive
        return 0 if ok else 1
    finally:
        stop_operator(operator)
        try:
            core.delete_namespace(NAMESPACE)
        except Exception:  # noqa: BLE001 - best effort
            pass
        if plane is not None:
            plane.stop()


if __name__ == "__main__":
    sys.exit(main())
