"""Pod builders (pure functions returning dicts) and pod status summaries.

Every pod of a job: ownerReference to the job (controller, so deleting the job deletes it),
labels `qtune.io/job`, `qtune.io/trial`, `qtune.io/job-uid`; Guaranteed QoS (whole CPUs,
requests = limits); required node affinity on the Intel Xeon pool's NFD labels unless
spec.trial.nodeAffinity replaces it; non-root, read-only root filesystem, no privilege
escalation, all capabilities dropped, seccomp RuntimeDefault; an emptyDir on /tmp; the job's
workspace PVC mounted at spec.workspace.mountPath.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from qtune.operator import constants as c
from qtune.operator.config import OperatorConfig
from qtune.spec.errors import SpecError
from qtune.spec.models import JobSpec

CONTAINER = "runner"
EXIT_TRIAL_FAILED = 2
EXIT_JOB_UNUSABLE = 1
BASELINE_DEADLINE_FACTOR = 2
"""The baseline (fp32 evaluation and benchmark plus op sensitivity) may take this many trial timeouts."""


@dataclass(frozen=True)
class JobRef:
    """Identity of one QuantizationJob object."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def from_body(cls, body: Any) -> JobRef:
        meta = body["metadata"]
        return cls(meta["name"], meta["namespace"], meta["uid"])


def owner_reference(job: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(job: JobRef, role: str, trial: int | str | None = None) -> dict[str, str]:
    out = {
        c.LABEL_JOB: job.name,
        c.LABEL_JOB_UID: job.uid,
        c.LABEL_ROLE: role,
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
    }
    if trial is not None:
        out[c.LABEL_TRIAL] = str(trial)
    return out


def job_selector(job: JobRef) -> str:
    return f"{c.LABEL_JOB_UID}={job.uid}"


def cluster_problem(spec: JobSpec) -> SpecError | None:
    """What the cluster needs beyond a valid spec; None when the job can run on the cluster."""
    if not spec.workspace.persistent_volume_claim:
        return SpecError("spec.workspace.persistentVolumeClaim",
                         "required on the cluster: the PVC that holds the model and data "
                         "(the job's relative paths resolve against spec.workspace.mountPath)")
    return None


def workspace_dir(spec: JobSpec, job: JobRef) -> str:
    """The job's workspace inside the pods: one folder per job object on the PVC."""
    return posixpath.join(spec.workspace.mount_path, ".qtune", f"{job.name}-{job.uid[:8]}")


def trial_dir(spec: JobSpec, job: JobRef, index: int) -> str:
    return posixpath.join(workspace_dir(spec, job), "trials", str(index))


def job_document(job: JobRef, spec: dict[str, Any]) -> dict[str, Any]:
    """The QuantizationJob the runner gets with --job-json (spec as stored, server defaults applied)."""
    return {"apiVersion": c.API_VERSION, "kind": c.KIND,
            "metadata": {"name": job.name, "namespace": job.namespace}, "spec": spec}


def default_node_affinity(config: OperatorConfig) -> dict[str, Any]:
    return {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{
                "matchExpressions": [
                    {"key": c.NFD_VENDOR, "operator": "In", "values": [config.vendor]},
                    {"key": config.isa_label, "operator": "In", "values": ["true"]},
                ],
            }],
        },
    }


def node_affinity(spec: JobSpec, config: OperatorConfig) -> dict[str, Any]:
    """spec.trial.nodeAffinity (a Kubernetes NodeAffinity; bare nodeSelectorTerms are accepted
    as the required terms) replaces the default Intel Xeon pool affinity."""
    override = spec.trial.node_affinity
    if not override:
        return default_node_affinity(config)
    if "nodeSelectorTerms" in override:
        return {"requiredDuringSchedulingIgnoredDuringExecution": dict(override)}
    return dict(override)


def resources(spec: JobSpec) -> dict[str, Any]:
    amount = {"cpu": str(spec.trial.resources.cpu), "memory": spec.trial.resources.memory}
    return {"requests": dict(amount), "limits": dict(amount)}


def _env(job: JobRef, spec: JobSpec, config: OperatorConfig) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "QTUNE_JOB_UID", "value": job.uid},
        {"name": "QTUNE_JOB_NAME", "value": job.name},
        {"name": "QTUNE_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "QTUNE_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "OMP_NUM_THREADS", "value": str(spec.trial.resources.cpu)},
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
    ]
    if config.pushgateway_for_pods:
        env.append({"name": "QTUNE_PUSHGATEWAY_URL", "value": config.pushgateway_for_pods})
    env += [{"name": k, "value": v} for k, v in sorted(config.pod_env.items())]
    return env


def _runner_args(command: str, job: JobRef, spec: JobSpec, spec_dict: dict[str, Any],
                 config: OperatorConfig) -> list[str]:
    args = [
        command,
        "--job-json", json.dumps(job_document(job, spec_dict), separators=(",", ":"), sort_keys=True),
        "--base-dir", spec.workspace.mount_path,
        "--workspace", workspace_dir(spec, job),
        "--threads", str(spec.trial.resources.cpu),
        "--job-uid", job.uid,
    ]
    if config.pushgateway_for_pods:
        args += ["--pushgateway", config.pushgateway_for_pods]
    return args


def _pod(job: JobRef, spec: JobSpec, config: OperatorConfig, *, name: str, role: str, trial: str,
         args: list[str], service_account: str | None, automount_token: bool, deadline: int,
         annotations: dict[str, str] | None = None) -> dict[str, Any]:
    image = spec.trial.image or config.trial_image
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "command": list(config.runner_command),
        "args": args,
        "env": _env(job, spec, config),
        "resources": resources(spec),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": c.TRIAL_UID,
            "runAsGroup": c.TRIAL_UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "workspace", "mountPath": spec.workspace.mount_path},
        ],
        "workingDir": spec.workspace.mount_path,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.trial.image_pull_policy:
        container["imagePullPolicy"] = spec.trial.image_pull_policy
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "activeDeadlineSeconds": deadline,
        "automountServiceAccountToken": automount_token,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": c.TRIAL_UID,
            "runAsGroup": c.TRIAL_UID,
            "fsGroup": c.TRIAL_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "affinity": {"nodeAffinity": node_affinity(spec, config)},
        "containers": [container],
        "volumes": [
            {"name": "tmp", "emptyDir": {}},
            {"name": "workspace",
             "persistentVolumeClaim": {"claimName": spec.workspace.persistent_volume_claim}},
        ],
    }
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    if spec.trial.node_selector:
        pod_spec["nodeSelector"] = dict(spec.trial.node_selector)
    tolerations = spec.trial.tolerations or list(config.default_tolerations)
    if tolerations:
        pod_spec["tolerations"] = [dict(t) for t in tolerations]
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": job.namespace,
        "labels": labels(job, role, trial),
        "ownerReferences": [owner_reference(job)],
    }
    if annotations:
        metadata["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def trial_pod(job: JobRef, spec: JobSpec, spec_dict: dict[str, Any], index: int, tune_config: dict[str, Any],
              config: OperatorConfig, config_key: str | None = None) -> dict[str, Any]:
    """The pod of trial `index`: `python -m qtune.runner trial ... --config JSON`."""
    args = _runner_args("trial", job, spec, spec_dict, config)
    args += ["--index", str(index), "--config", json.dumps(tune_config, separators=(",", ":"), sort_keys=True)]
    annotations = {f"{c.GROUP}/config-key": config_key} if config_key else None
    return _pod(job, spec, config, name=c.trial_pod(job.name, index), role=c.ROLE_TRIAL, trial=str(index),
                args=args, service_account=spec.trial.service_account_name or config.trial_service_account,
                automount_token=False, deadline=int(spec.tuning.trial_timeout_seconds),
                annotations=annotations)


def baseline_pod(job: JobRef, spec: JobSpec, spec_dict: dict[str, Any], config: OperatorConfig) -> dict[str, Any]:
    """The baseline pod: fp32 accuracy/latency, the tuning space and the calibration cache in the
    workspace; publishes space.json and baseline.json to the job's baseline ConfigMap (its
    ServiceAccount, `<job>-runner` or the job's own, is bound to a Role for that ConfigMap only)."""
    args = _runner_args("baseline", job, spec, spec_dict, config)
    args += ["--publish-configmap", c.baseline_configmap(job.name)]
    account = spec.trial.service_account_name or c.runner_account(job.name)
    return _pod(job, spec, config, name=c.baseline_pod(job.name), role=c.ROLE_BASELINE, trial=c.BASELINE_TRIAL,
                args=args, service_account=account, automount_token=True,
                deadline=BASELINE_DEADLINE_FACTOR * int(spec.tuning.trial_timeout_seconds))


def runner_rbac(job: JobRef, account: str | None = None) -> list[dict[str, Any]]:
    """Role + RoleBinding letting the baseline pod's ServiceAccount get/update/patch the job's
    baseline ConfigMap only (the operator creates that ConfigMap empty beforehand); plus the
    per-job ServiceAccount `<job>-runner` unless the job names its own (spec.trial.serviceAccountName)."""
    name = c.runner_account(job.name)
    meta = {"name": name, "namespace": job.namespace, "labels": labels(job, c.ROLE_BASELINE),
            "ownerReferences": [owner_reference(job)]}
    objects: list[dict[str, Any]] = []
    if not account:
        objects.append({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": dict(meta)})
    objects += [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": dict(meta),
         "rules": [{"apiGroups": [""], "resources": ["configmaps"],
                    "resourceNames": [c.baseline_configmap(job.name)],
                    "verbs": ["get", "update", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": dict(meta),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": account or name, "namespace": job.namespace}]},
    ]
    return objects


def configmap(job: JobRef, name: str, role: str, data: dict[str, str] | None = None,
              binary_data: dict[str, str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": job.namespace, "labels": labels(job, role),
                     "ownerReferences": [owner_reference(job)]},
        "data": dict(data or {}),
    }
    if binary_data:
        body["binaryData"] = dict(binary_data)
    return body


# --------------------------------------------------------------------------------------------
# pod status summaries (what the operator's pod index keeps)
# --------------------------------------------------------------------------------------------


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class PodSummary:
    name: str
    namespace: str
    job_uid: str
    trial: str
    phase: str
    uid: str = ""
    created: float | None = None
    started: float | None = None
    finished: float | None = None
    reason: str | None = None
    """Pod-level reason (DeadlineExceeded, Evicted) or the container's terminated reason."""
    container_reason: str | None = None
    exit_code: int | None = None
    message: str | None = None
    node: str | None = None
    deleting: bool = False
    unschedulable: str | None = None
    """The scheduler's message while the pod cannot be placed."""

    @property
    def index(self) -> int | None:
        return int(self.trial) if self.trial.isdigit() else None

    @property
    def done(self) -> bool:
        return self.phase in ("Succeeded", "Failed")


def summarize_pod(body: Any) -> PodSummary:
    meta, status = body.get("metadata", {}), body.get("status") or {}
    lbl = meta.get("labels") or {}
    terminated: dict[str, Any] = {}
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") == CONTAINER or not terminated:
            terminated = (cs.get("state") or {}).get("terminated") or terminated
    unschedulable = None
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            unschedulable = cond.get("message") or cond.get("reason")
    return PodSummary(
        name=meta.get("name", ""),
        namespace=meta.get("namespace", ""),
        job_uid=lbl.get(c.LABEL_JOB_UID, ""),
        trial=lbl.get(c.LABEL_TRIAL, ""),
        phase=status.get("phase") or "Pending",
        uid=meta.get("uid", ""),
        created=parse_time(meta.get("creationTimestamp")),
        started=parse_time(status.get("startTime")),
        finished=parse_time(terminated.get("finishedAt")),
        reason=status.get("reason") or terminated.get("reason"),
        container_reason=terminated.get("reason"),
        exit_code=terminated.get("exitCode"),
        message=(terminated.get("message") or status.get("message") or None),
        node=(body.get("spec") or {}).get("nodeName"),
        deleting=bool(meta.get("deletionTimestamp")),
        unschedulable=unschedulable,
    )


_REASON = re.compile(r"^\s*([A-Z][A-Za-z0-9]+):\s*(.*)$", re.S)


def failure_of(pod: PodSummary) -> tuple[str, str]:
    """(reason, message) of a failed pod, for the trial record and the condition message."""
    message = (pod.message or "").strip()
    if pod.container_reason == "OOMKilled" or pod.reason == "OOMKilled":
        return "OOMKilled", message or "the trial exceeded its memory limit (spec.trial.resources.memory)"
    if pod.reason == "DeadlineExceeded":
        return "Timeout", message or "the trial exceeded spec.tuning.trialTimeoutSeconds"
    if pod.reason in ("Evicted", "Preempting", "NodeLost", "Shutdown", "Terminated"):
        return pod.reason, message or f"the pod was stopped by the node ({pod.reason})"
    if pod.exit_code == EXIT_TRIAL_FAILED:
        match = _REASON.match(message)
        if match:
            return match.group(1), match.group(2).strip()[:2000]
        return "TrialError", message[:2000]
    if pod.exit_code == EXIT_JOB_UNUSABLE:
        return "RunnerError", message[:2000]
    detail = f"exit code {pod.exit_code}" if pod.exit_code is not None else (pod.reason or "failed")
    return "Crashed", f"{detail}; {message}"[:2000] if message else detail


def model_path_of(pod: PodSummary) -> str | None:
    """The quantized model path when the runner left it as a JSON termination message."""
    text = (pod.message or "").strip()
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text).get("model_path")
    except (ValueError, AttributeError):
        return None
    return str(value) if value else None
