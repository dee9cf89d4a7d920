"""Shared pieces of the operator unit tests: a job body, a tiny tuning space, fakes of the cluster.

(Not named conftest.py: tests/cluster has a conftest module of its own.)
"""

from __future__ import annotations

import copy
import itertools
import re
from typing import Any

from kubernetes.client import ApiException

from qtune.operator import constants as c
from qtune.operator.config import OperatorConfig
from qtune.operator.kube import Conflict
from qtune.tuning.history import Baseline
from qtune.tuning.space import OpSpace, TuningSpace

UID = "0b6c7f5e-8d1a-4c2e-9f00-123456789abc"
CLAIM = "qtune-work"


def job_body(name: str = "digits", spec: dict[str, Any] | None = None, generation: int = 1,
             status: dict[str, Any] | None = None, uid: str = UID) -> dict[str, Any]:
    spec = spec if spec is not None else {
        "model": {"framework": "onnxruntime", "path": "model.onnx"},
        "data": {"calibration": {"path": "calib.npz"}, "evaluation": {"path": "eval.npz"}},
        "tuning": {"maxTrials": 6, "parallelTrials": 2, "objective": "size"},
        "trial": {"resources": {"cpu": 2, "memory": "1Gi"}},
        "workspace": {"persistentVolumeClaim": CLAIM, "mountPath": "/workspace"},
    }
    return {"apiVersion": c.API_VERSION, "kind": c.KIND,
            "metadata": {"name": name, "namespace": "ml", "uid": uid, "generation": generation},
            "spec": spec, "status": status or {}}


def tiny_space() -> TuningSpace:
    """Three ops; static only; two calibration algorithms (so `basic` has a variant stage)."""
    act = {"dtype": ["uint8", "fp32"], "scheme": ["asym"], "granularity": ["per_tensor"],
           "algorithm": ["minmax", "percentile"]}
    weight = {"dtype": ["int8", "fp32"], "scheme": ["sym"], "granularity": ["per_channel"], "algorithm": ["minmax"]}
    ops = {name: OpSpace(name, op_type, dict(act), dict(weight) if op_type != "Relu" else None, ["static"])
           for name, op_type in (("conv1", "Conv"), ("conv2", "Conv"), ("fc", "Gemm"))}
    return TuningSpace(ops=ops, approaches=["static"], format="QDQ", calibration_sampling_size=100,
                       sensitivity={"fc": 0.3, "conv2": 0.2, "conv1": 0.1})


def tiny_baseline() -> Baseline:
    return Baseline(accuracy=0.95, latency_ms={"1": 1.0, "32": 10.0}, latency_p90_ms={"1": 1.2, "32": 12.0},
                    model_size_bytes=400_000, seconds=3.0)


class FakeKube:
    """An in-memory stand-in for qtune.operator.kube.Kube (pods, ConfigMaps, status)."""

    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.configmaps: dict[str, dict[str, Any]] = {}
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.status: dict[str, Any] = {}
        self.patches: list[dict[str, Any]] = []
        self.created_pods: list[str] = []
        self.deleted_pods: list[str] = []
        self.deleted_objects: list[tuple[str, str]] = []
        self.force_deleted: list[str] = []
        self.nodes: dict[str, dict[str, Any]] = {}
        self.workloads: list[dict[str, Any]] | None = None
        """Kueue's Workloads of the namespace; None: the API has none (Kueue not installed, HTTP 404)."""
        self.custom_lists = 0
        self._rv = itertools.count(1)
        self.add_claim(CLAIM)

    def add_claim(self, name: str, labels: dict[str, str] | None = None) -> None:
        """A PVC of the namespace (by default opted in as a workspace, as job_body's `qtune-work`)."""
        key, _, value = c.DEFAULT_WORKSPACE_LABEL.partition("=")
        self.objects[("PersistentVolumeClaim", name)] = {
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "labels": {key: value} if labels is None else dict(labels)}}

    async def create_pod(self, body: dict[str, Any]) -> bool:
        name = body["metadata"]["name"]
        if name in self.pods:
            return False
        self.pods[name] = copy.deepcopy(body)
        self.pods[name]["metadata"]["uid"] = f"pod-uid-{next(self._rv)}"
        self.created_pods.append(name)
        return True

    async def delete_pod(self, namespace: str, name: str, grace_seconds: int | None = None) -> bool:
        self.deleted_pods.append(name)
        if grace_seconds == 0:
            self.force_deleted.append(name)
        return self.pods.pop(name, None) is not None

    def _selected(self, namespace: str, selector: str) -> list[str]:
        """Names of the pods in `namespace` (a pod without one is in every namespace) that `selector` selects."""
        return [name for name, pod in self.pods.items()
                if pod["metadata"].get("namespace", namespace) == namespace
                and matches_labels(pod["metadata"].get("labels") or {}, selector)]

    async def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return [self.pods[name] for name in self._selected(namespace, selector)]

    async def list_custom(self, group: str, version: str, namespace: str, plural: str) -> dict[str, Any]:
        self.custom_lists += 1
        if self.workloads is None or (group, plural) != ("kueue.x-k8s.io", "workloads"):
            raise ApiException(status=404, reason="Not Found")
        return {"items": copy.deepcopy(self.workloads)}

    async def read_node(self, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.nodes.get(name))

    async def read_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        body = self.configmaps.get(name)
        return copy.deepcopy(body) if body else None

    async def create_configmap(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        if name in self.configmaps:
            raise Conflict(name)
        body = copy.deepcopy(body)
        body["metadata"]["resourceVersion"] = str(next(self._rv))
        self.configmaps[name] = body
        return copy.deepcopy(body)

    async def replace_configmap(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        old = self.configmaps.get(name)
        if old is None or old["metadata"]["resourceVersion"] != body["metadata"].get("resourceVersion"):
            raise Conflict(name)
        body = copy.deepcopy(body)
        body["metadata"]["resourceVersion"] = str(next(self._rv))
        self.configmaps[name] = body
        return copy.deepcopy(body)

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        self.deleted_objects.append((kind, name))
        if kind == "ConfigMap":
            return self.configmaps.pop(name, None) is not None
        return self.objects.pop((kind, name), None) is not None

    async def ensure(self, body: dict[str, Any]) -> bool:
        if body["kind"] == "ConfigMap":
            if body["metadata"]["name"] in self.configmaps:
                return False
            await self.create_configmap(body)
            return True
        key = (body["kind"], body["metadata"]["name"])
        if key in self.objects:
            return False
        self.objects[key] = body
        return True

    async def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        body = self.objects.get((kind, name))
        return copy.deepcopy(body) if body is not None else None

    async def patch_job_status(self, namespace: str, name: str, patch: dict[str, Any]) -> bool:
        self.patches.append(copy.deepcopy(patch))
        self.status = merge(self.status, patch)
        return True

    # test helpers --------------------------------------------------------------------------
    def finish_pod(self, name: str, phase: str = "Succeeded", **terminated: Any) -> None:
        pod = self.pods[name]
        state = {"exitCode": 0 if phase == "Succeeded" else 1, "reason": "Completed" if phase == "Succeeded"
                 else "Error", "finishedAt": "2024-01-01T00:00:00Z", **terminated}
        pod["status"] = {"phase": phase, "startTime": "2024-01-01T00:00:00Z",
                         "containerStatuses": [{"name": "runner", "state": {"terminated": state}}]}

    def run_pod(self, name: str) -> None:
        self.pods[name]["status"] = {"phase": "Running", "startTime": "2099-01-01T00:00:00Z"}


_SET_TERM = re.compile(r"^\s*([^\s!=(),]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def inputs_of(pod: dict[str, Any], configmaps: dict[str, Any]) -> dict[str, str]:
    """The input files a unit's runner reads: from its pod's annotations (a downwardAPI volume), else from its
    inputs ConfigMap."""
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "inputs")
    if "configMap" in volume:
        return dict(configmaps[volume["configMap"]["name"]]["data"])
    annotations = pod["metadata"]["annotations"]
    keys = {item["path"]: re.fullmatch(r"metadata\.annotations\['(.+)'\]", item["fieldRef"]["fieldPath"])
            for item in volume["downwardAPI"]["items"]}
    return {path: annotations[key[1]] for path, key in keys.items() if key is not None}


def matches_labels(labels: dict[str, str], selector: str) -> bool:
    """Kubernetes' label selector, as the API server applies it: `a=b`, `a==b`, `a!=b`, `a` (present),
    `!a` (absent), `a in (x,y)`, `a notin (x,y)`; terms separated by commas are ANDed."""
    terms = [term.strip() for term in re.split(r",(?![^()]*\))", selector) if term.strip()]
    for term in terms:
        if found := _SET_TERM.match(term):
            key, op, values = found.group(1), found.group(2), {v.strip() for v in found.group(3).split(",")}
            if (labels.get(key) in values) != (op == "in"):
                return False
        elif "!=" in term:
            key, value = (part.strip() for part in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (part.strip() for part in term.replace("==", "=", 1).split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def merge(old: Any, patch: Any) -> Any:
    if not isinstance(patch, dict) or not isinstance(old, dict):
        return copy.deepcopy(patch)
    out = dict(old)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(old.get(key), value)
    return out


class FakeResults:
    """Prometheus + Pushgateway in one: observed results by unit, deletions recorded."""

    def __init__(self) -> None:
        self.results: dict[str, Any] = {}
        self.deleted: list[str] = []
        self.queries = 0

    async def job_results(self, job_uid: str) -> dict[str, Any]:
        self.queries += 1
        return dict(self.results)

    async def delete_group(self, job_uid: str, unit: str) -> None:
        self.deleted.append(str(unit))
        self.results.pop(str(unit), None)

    async def delete_unit_groups(self, job_uid: str, unit: str) -> int:
        await self.delete_group(job_uid, unit)
        return 1

    async def delete_job_groups(self, job_uid: str) -> int:
        count = len(self.results)
        self.results.clear()
        return count


def make_config() -> OperatorConfig:
    return OperatorConfig(prometheus_url="http://prom:9090", pushgateway_url="http://pgw:9091",
                          trial_image="qtune:test", signing_key=SIGNING_KEY)


SIGNING_KEY = "test-signing-key"


class FakePoller:
    """The operator-wide results poller: a snapshot of one job's results."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {}
        self.taken_at = 0.0

    def results(self, job_uid: str) -> dict[str, Any]:
        return dict(self.snapshot)

    def watch(self, job_uid: str, waiting: bool) -> None:
        self.waiting = waiting
