"""Fan-out benchmark of the QuantizationJob operator on the test control plane.

Many jobs at once; trial pods run a FAKE, trivially fast trial (this file's `fake-runner`
command: it pushes made-up metrics and exits) instead of the real runner, so what is measured is
the operator itself, not ONNX Runtime. Prints:

* trial pods created per second (all jobs together),
* dispatch latency: from a trial's result being queryable in Prometheus to the job's next trial
  pod being created (p50/p90), measured from outside (a 10 Hz Prometheus poller and a pod watch),
* the operator's peak memory (VmHWM of its process), and its own dispatch histogram.

    python benchmarks/operator_fanout.py [--jobs 20] [--trials 10] [--parallel 2]
    python benchmarks/operator_fanout.py --existing   # use the plane of $KUBECONFIG / QTUNE_* env

Without --existing it starts a plane (tests/cluster/plane.py) in a folder under /var/tmp (the
node agent's /tmp emptyDir mounts hide state folders that live under /tmp).
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = f"qtune-bench-{os.getpid()}"
CLAIM = "qtune-work"

# --------------------------------------------------------------------------------------------
# the fake runner (what trial pods run in this benchmark only)
# --------------------------------------------------------------------------------------------


def fake_space() -> dict[str, Any]:
    """Three op types with two calibration algorithms each: 27 exhaustive configs plus the default."""
    from qtune.tuning.space import OpSpace, TuningSpace

    act = {"dtype": ["uint8", "fp32"], "scheme": ["asym"], "granularity": ["per_tensor"],
           "algorithm": ["minmax", "percentile"]}
    weight = {"dtype": ["int8", "fp32"], "scheme": ["sym"], "granularity": ["per_channel"], "algorithm": ["minmax"]}
    ops = {f"op{i}": OpSpace(f"op{i}", op_type, dict(act), dict(weight), ["static"])
           for i, op_type in enumerate(("Conv", "Conv", "MatMul", "Gemm"))}
    return TuningSpace(ops=ops, approaches=["static"], format="QDQ", calibration_sampling_size=100).to_dict()


def fake_runner(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("--workspace")
    parser.add_argument("--index", default="0")
    parser.add_argument("--config")
    parser.add_argument("--pushgateway")
    parser.add_argument("--job-uid")
    parser.add_argument("--publish-configmap")
    args, _ = parser.parse_known_args(argv)
    from qtune.runner.metrics import push_result

    if args.command == "baseline":
        from qtune.runner.publish import publish_baseline

        workspace = Path(args.workspace)
        workspace.mkdir(parents=True, exist_ok=True)
        (workspace / "space.json").write_text(json.dumps(fake_space()))
        baseline = {"accuracy": 0.9, "latency_ms": {"1": 1.0, "32": 20.0}, "latency_p90_ms": {"1": 1.1, "32": 22.0},
                    "model_size_bytes": 1_000_000, "seconds": 0.1}
        (workspace / "baseline.json").write_text(json.dumps(baseline))
        publish_baseline(args.publish_configmap, workspace)
        push_result(args.pushgateway, args.job_uid, "baseline", {"status": "succeeded", "accuracy": 0.9})
        return 0
    config = json.loads(args.config)
    quantized = sum(1 for op in config["ops"].values() if op["activation"]["dtype"] != "fp32")
    push_result(args.pushgateway, args.job_uid, args.index, {
        "status": "succeeded", "accuracy": 0.9, "latency_ms": {"1": 1.0 - 0.1 * quantized, "32": 20.0 - quantized},
        "latency_p90_ms": {"1": 1.1, "32": 22.0}, "model_size_bytes": 1_000_000 - 100_000 * quantized,
        "timings": {"total": 0.01}})
    return 0


# --------------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class Observer:
    """A pod watch (trial pod creation times) and a 10 Hz Prometheus poller (result times)."""

    def __init__(self, core: Any, prometheus: str) -> None:
        self.core = core
        self.prometheus = prometheus
        self.pod_added: dict[tuple[str, int], float] = {}
        self.result_seen: dict[tuple[str, int], float] = {}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._watch, daemon=True),
                        threading.Thread(target=self._poll, daemon=True)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _watch(self) -> None:
        from kubernetes import watch

        while not self.stop.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(self.core.list_namespaced_pod, NAMESPACE,
                                           label_selector="qtune.io/role=trial", timeout_seconds=30):
                    if event["type"] in ("ADDED", "MODIFIED"):
                        labels = event["object"].metadata.labels
                        key = (labels["qtune.io/job-uid"], int(labels["qtune.io/trial"]))
                        created = event["object"].metadata.creation_timestamp.timestamp()
                        # the event's arrival; a (re)listed pod counts from its creationTimestamp
                        self.pod_added.setdefault(key, time.time() if event["type"] == "ADDED" and
                                                  time.time() - created < 2 else created)
                    if self.stop.is_set():
                        stream.stop()
                        break
            except Exception:  # noqa: BLE001 - e.g. 504 "too large resource version", a cut stream
                time.sleep(0.2)  # list and watch again (until stopped)

    def _poll(self) -> None:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode(
            {"query": 'qtune_trial_status{job="qtune_trial",trial!="baseline"}'})
        while not self.stop.is_set():
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    data = json.load(response)["data"]["result"]
                now = time.time()
                for sample in data:
                    metric = sample["metric"]
                    self.result_seen.setdefault((metric["job_uid"], int(metric["trial"])), now)
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)

    def dispatch_latencies(self) -> list[float]:
        """For each result, the time until the next trial pod of the same job appeared."""
        by_job: dict[str, list[float]] = {}
        for (uid, _), added in self.pod_added.items():
            by_job.setdefault(uid, []).append(added)
        out = []
        for (uid, _), seen in self.result_seen.items():
            later = [t for t in by_job.get(uid, []) if t >= seen]
            if later:
                out.append(min(later) - seen)
        return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def job(name: str, trials: int, parallel: int) -> dict[str, Any]:
    return {
        "apiVersion": "qtune.io/v1alpha1", "kind": "QuantizationJob", "metadata": {"name": name},
        "spec": {
            "model": {"framework": "onnxruntime", "path": "model.onnx"},
            "data": {"calibration": {"path": "calib.npz"}, "evaluation": {"path": "eval.npz"}},
            "tuning": {"strategy": "exhaustive", "objective": "size", "maxTrials": trials, "parallelTrials": parallel},
            "trial": {"resources": {"cpu": 1, "memory": "256Mi"}},
            "workspace": {"persistentVolumeClaim": CLAIM},
        },
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fake-runner":
        return fake_runner(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--trials", type=int, default=10, help="maxTrials of each job")
    parser.add_argument("--parallel", type=int, default=2, help="parallelTrials of each job")
    parser.add_argument("--existing", action="store_true", help="use the plane of the environment")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT / "tests" / "cluster"))
    sys.path.insert(0, str(ROOT / "tests" / "cluster" / "operator"))
    plane = None
    if args.existing:
        kubeconfig, prometheus = os.environ["KUBECONFIG"], os.environ["QTUNE_PROMETHEUS_URL"]
        pushgateway = os.environ["QTUNE_PUSHGATEWAY_URL"]
    else:
        import plane as plane_mod

        state = Path(tempfile.mkdtemp(prefix="qtune-bench-plane-", dir="/var/tmp"))
        plane = plane_mod.Plane(state_dir=state).start()
        kubeconfig, prometheus, pushgateway = str(plane.kubeconfig), plane.prometheus_url, plane.pushgateway_url
    import opcluster
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=kubeconfig)
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    operator = None
    try:
        opcluster.install_crds(api)
        try:
            core.create_namespace({"metadata": {"name": NAMESPACE}})
        except client.ApiException as exc:
            if exc.status != 409:
                raise
        for _ in range(100):  # the namespace's default ServiceAccount
            try:
                core.read_namespaced_service_account("default", NAMESPACE)
                break
            except client.ApiException:
                time.sleep(0.2)
        try:
            core.create_namespaced_persistent_volume_claim(NAMESPACE, {
                "metadata": {"name": CLAIM},
                "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}})
        except client.ApiException as exc:
            if exc.status != 409:
                raise

        env = {**os.environ, "KUBECONFIG": kubeconfig, "QTUNE_PROMETHEUS_URL": prometheus,
               "QTUNE_PUSHGATEWAY_URL": pushgateway,
               "QTUNE_RUNNER_COMMAND": f"{sys.executable} {Path(__file__).resolve()} fake-runner"}
        log = open(Path(tempfile.gettempdir()) / "qtune-bench-operator.log", "wb")  # noqa: SIM115
        metrics_port = opcluster.free_port()
        operator = subprocess.Popen([sys.executable, "-m", "qtune.operator.main", "-n", NAMESPACE,
                                     "--metrics-port", str(metrics_port), "--health-port", "0",
                                     "--log-level", "WARNING"],
                                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        time.sleep(4)
        observer = Observer(core, prometheus)
        observer.start()
        print(f"operator_fanout: {args.jobs} jobs x {args.trials} trials ({args.parallel} at once), "
              "FAKE trial pods (a tiny script pushing made-up metrics; measures the operator, not ONNX Runtime)")
        started = time.time()
        names = [f"bench-{i:03d}" for i in range(args.jobs)]
        for name in names:
            custom.create_namespaced_custom_object("qtune.io", "v1alpha1", NAMESPACE, "quantizationjobs",
                                                   job(name, args.trials, args.parallel))
        done: dict[str, dict[str, Any]] = {}
        while len(done) < len(names) and time.time() - started < args.timeout:
            for item in custom.list_namespaced_custom_object("qtune.io", "v1alpha1", NAMESPACE,
                                                             "quantizationjobs")["items"]:
                status = item.get("status") or {}
                if status.get("state") in ("Succeeded", "Failed"):
                    done[item["metadata"]["name"]] = status
            time.sleep(1)
        elapsed = time.time() - started
        time.sleep(1)
        observer.stop.set()
        rss = peak_rss_mib(operator.pid)
        cpu = cpu_seconds(operator.pid)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            own = response.read().decode()

        created = sorted(observer.pod_added.values())
        rate = (len(created) - 1) / (created[-1] - created[0]) if len(created) > 1 else float("nan")
        latencies = observer.dispatch_latencies()
        states: dict[str, int] = {}
        for status in done.values():
            states[status["state"]] = states.get(status["state"], 0) + 1
        own_count = own_sum = 0.0
        for line in own.splitlines():
            if line.startswith("qtune_operator_dispatch_latency_seconds_count"):
                own_count = float(line.split()[-1])
            elif line.startswith("qtune_operator_dispatch_latency_seconds_sum"):
                own_sum = float(line.split()[-1])
        print(f"  jobs finished: {len(done)}/{len(names)} {states} in {elapsed:.1f}s")
        print(f"  trial pods created: {len(created)}; pods created per second: {rate:.2f} "
              f"(over {created[-1] - created[0]:.1f}s)" if created else "  no trial pods seen")
        print(f"  dispatch latency (result queryable in Prometheus -> next trial pod created), "
              f"{len(latencies)} samples: p50 {percentile(latencies, 0.5):.3f}s, "
              f"p90 {percentile(latencies, 0.9):.3f}s, max {max(latencies, default=float('nan')):.3f}s")
        if own_count:
            print(f"  operator's own histogram (result read -> next pod created): {int(own_count)} samples, "
                  f"mean {own_sum / own_count:.3f}s")
        print(f"  operator peak RSS: {rss:.1f} MiB; operator CPU time: {cpu:.1f}s over {elapsed:.0f}s "
              f"(load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
        if latencies:
            print(f"  (mean {statistics.mean(latencies):.3f}s; Prometheus scrape interval of the plane: 1s)")
        return 0 if len(done) == len(names) else 1
    finally:
        if operator is not None and operator.poll() is None:
            os.kill(operator.pid, signal.SIGTERM)
            try:
                operator.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(operator.pid, signal.SIGKILL)
        try:
            core.delete_namespace(NAMESPACE)
        except Exception:  # noqa: BLE001 - best effort
            pass
        if plane is not None:
            plane.stop()


if __name__ == "__main__":
    sys.exit(main())
