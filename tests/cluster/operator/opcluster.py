"""Helpers of the operator's cluster tests: the operator as a subprocess, CRDs, jobs, Pushgateway."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
CRDS = ROOT / "crds"
DIGITS = ROOT / "examples" / "digits"
DIGITS_FILES = ("model.onnx", "calib.npz", "eval.npz")
GROUP, VERSION, PLURAL = "qtune.io", "v1alpha1", "quantizationjobs"
CLAIM = "qtune-work"
WORKSPACE_LABELS = {"qtune.io/workspace": "true"}
"""The operator's default opt-in label of a workspace PVC (qtune.operator.constants.DEFAULT_WORKSPACE_LABEL)."""
SIGNING_KEY = "cluster-test-signing-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OperatorProcess:
    """`python -m qtune.cli.main operator ...` (what `qtune operator` runs), started and killed by pid."""

    def __init__(self, cluster: Any, namespaces: list[str], log_dir: Path, *extra: str,
                 name: str = "operator") -> None:
        self.cluster = cluster
        self.namespaces = namespaces
        self.extra = list(extra)
        self.log_path = log_dir / f"{name}.log"
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, ready_timeout: float = 60.0) -> OperatorProcess:
        argv = [sys.executable, "-m", "qtune.cli.main", "operator",
                "--metrics-port", str(self.metrics_port), "--health-port", str(self.health_port),
                "--poll-interval", "1", *self.extra]
        for ns in self.namespaces:
            argv += ["-n", ns]
        env = {**os.environ, "KUBECONFIG": str(self.cluster.kubeconfig), "PYTHONUNBUFFERED": "1"}
        env["QTUNE_PROMETHEUS_URL"] = self.cluster.prometheus_url or ""
        env["QTUNE_PUSHGATEWAY_URL"] = self.cluster.pushgateway_url or ""
        env.setdefault("QTUNE_SIGNING_KEY", SIGNING_KEY)  # stable across restarts, as the chart's Secret
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start {self.starts}: {' '.join(argv)}\n".encode())
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                         start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the operator exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
            time.sleep(0.3)
        raise RuntimeError(f"the operator did not become healthy:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()


# ---------------------------------------------------------------------------------------- CRDs


def install_crds(api_client: Any, timeout: float = 60.0) -> None:
    """Create or replace the CRDs of crds/ and wait until they are Established."""
    import yaml
    from kubernetes import client

    ext = client.ApiextensionsV1Api(api_client)
    names = []
    for path in sorted(CRDS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            name = doc["metadata"]["name"]
            names.append(name)
            try:
                current = ext.read_custom_resource_definition(name)
                doc["metadata"]["resourceVersion"] = current.metadata.resource_version
                ext.replace_custom_resource_definition(name, doc)
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
                ext.create_custom_resource_definition(doc)
    deadline = time.monotonic() + timeout
    for name in names:
        while True:
            crd = ext.read_custom_resource_definition(name)
            conds = {c.type: c.status for c in (crd.status.conditions or [])}
            if conds.get("Established") == "True":
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"CRD {name} not Established")
            time.sleep(0.2)


# ---------------------------------------------------------------------------------------- jobs


def job_manifest(name: str, **tuning: Any) -> dict[str, Any]:
    """The digits job of the operator tests: exhaustive search (a fixed trial sequence), objective
    size (a deterministic winner), short benchmarks, 1-CPU trials, the workspace PVC."""
    spec_tuning = {"strategy": "exhaustive", "accuracyCriterion": {"relative": 0.01, "higherIsBetter": True},
                   "objective": "size", "maxTrials": 4, "parallelTrials": 2, "seed": 0, **tuning}
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "QuantizationJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"framework": "onnxruntime", "path": "model.onnx"},
            "data": {"calibration": {"path": "calib.npz", "samples": 100},
                     "evaluation": {"path": "eval.npz", "metric": "top1"}},
            "quantization": {"approach": "static", "format": "QDQ"},
            "tuning": spec_tuning,
            "benchmark": {"batchSizes": [1, 16], "warmupRuns": 2, "runs": 5},
            "trial": {"resources": {"cpu": 1, "memory": "2Gi"}},
            "workspace": {"persistentVolumeClaim": CLAIM},
        },
    }


def ensure_digits() -> Path:
    """examples/digits/{model.onnx, calib.npz, eval.npz}, built when missing."""
    if not all((DIGITS / f).is_file() for f in DIGITS_FILES):
        subprocess.run([sys.executable, str(DIGITS / "build.py")], check=True, cwd=ROOT, timeout=900)
    return DIGITS


def prepare_workspace(cluster: Any, namespace: str) -> Path:
    """A PVC `qtune-work` holding the digits model and data (copied into its host folder), opted in as a
    workspace by the label the operator requires by default (QTUNE_WORKSPACE_CLAIM_LABEL)."""
    from kubernetes import client

    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_persistent_volume_claim(namespace, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": CLAIM, "labels": dict(WORKSPACE_LABELS)},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}})
    folder = cluster.state_dir / "agent" / "pvc" / namespace / CLAIM
    folder.mkdir(parents=True, exist_ok=True)
    source = ensure_digits()
    for name in DIGITS_FILES:
        shutil.copy2(source / name, folder / name)
    return folder


def custom(cluster: Any) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(cluster.api_client())


def create_job(cluster: Any, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
    return custom(cluster).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                           copy.deepcopy(manifest))


def get_job(cluster: Any, namespace: str, name: str) -> dict[str, Any] | None:
    from kubernetes import client

    try:
        return custom(cluster).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def pushgateway_groups(cluster: Any, job_uid: str) -> list[str]:
    with urllib.request.urlopen(f"{cluster.pushgateway_url}/api/v1/metrics", timeout=5) as r:
        data = json.load(r)["data"]
    return [g["labels"].get("unit", "") for g in data if g["labels"].get("job_uid") == job_uid]


def pod_runs(cluster: Any, namespace: str) -> dict[str, int]:
    """How many times the node agent started each pod name (one folder per pod uid)."""
    root = cluster.state_dir / "agent" / "pods" / namespace
    if not root.is_dir():
        return {}
    return {p.name: sum(1 for d in p.iterdir() if d.is_dir()) for p in root.iterdir() if p.is_dir()}


def local_best(workspace: Path, tmp_path: Path, max_trials: int) -> tuple[str, list[str]]:
    """`qtune tune` (qtune.local) on the digits job of `job_manifest`: (the winner's config key, every
    trial's config key in order)."""
    import yaml

    from qtune.local.driver import tune
    from qtune.spec import load_job

    folder = tmp_path / "local"
    folder.mkdir()
    for name in DIGITS_FILES:
        shutil.copy2(workspace / name, folder / name)
    manifest = job_manifest("digits-local", maxTrials=max_trials)
    (folder / "job.yaml").write_text(yaml.safe_dump(manifest))
    job = load_job(folder / "job.yaml")
    outcome = tune(job, folder / "job.yaml", output_dir=folder / "out")
    assert outcome.best is not None
    return outcome.best.config_key, [t.config_key for t in outcome.history.trials]


def job_status(cluster: Any, namespace: str, name: str) -> dict[str, Any]:
    return (get_job(cluster, namespace, name) or {}).get("status") or {}


def job_history(cluster: Any, namespace: str, name: str) -> Any:
    """The job's History, from its history ConfigMap (the operator's signature verified)."""
    from kubernetes import client

    from qtune.operator.constants import history_configmap
    from qtune.operator.store import decode_history

    body = client.CoreV1Api(cluster.api_client()).read_namespaced_config_map(history_configmap(name), namespace)
    history = decode_history({"data": body.data, "binaryData": body.binary_data})
    assert history is not None
    return history


def host_path(pod_path: str, mount_path: str, workspace: Path) -> Path:
    """Where a path of the pods is on this machine (the node agent bind-mounts the PVC's folder on the mountPath,
    or, without mount namespaces, rewrites mountPaths to host folders: then the path is the host's already)."""
    if Path(pod_path).is_relative_to(workspace):
        return Path(pod_path)
    assert pod_path.startswith(mount_path + "/"), (pod_path, mount_path)
    return workspace / pod_path[len(mount_path) + 1:]


def onnx_file(path: Path) -> Path:
    """A saved ONNX model: the file, or the .onnx file of a model folder."""
    return path if path.is_file() else min(path.glob("*.onnx"))


def op_types(path: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(onnx_file(path)), load_external_data=False).graph.node}
