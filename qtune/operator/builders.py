"""Pure builders of what the operator creates for one unit of work: its pod, the ConfigMap holding
its inputs (job document, tune config) when they are too large for the pod, and the Secret holding its
result secret.

Every pod of a job: ownerReference to the job (controller, so deleting the job deletes it),
labels `qtune.io/job`, `qtune.io/job-uid`, `qtune.io/unit`, `qtune.io/attempt` (and
`qtune.io/trial` for trials); Guaranteed QoS (whole CPUs, requests = limits); required node
affinity on the Intel Xeon pool's NFD labels, which spec.trial.nodeAffinity narrows (never replaces);
non-root, read-only root filesystem, no privilege escalation, all capabilities dropped, seccomp
RuntimeDefault; runs as the job's own ServiceAccount (or an opted-in named one, qtune/operator/rbac.py);
an emptyDir on /tmp (sizeLimit) and an ephemeral-storage request and limit; the unit's input files
read-only on /etc/qtune/unit: from the pod's own annotations (a downwardAPI volume) when they fit in
INLINE_INPUTS_LIMIT, else from its inputs ConfigMap (the tune config never travels as argv: a 2,000-op
config would exceed Linux's per-argument limit).

What a pod may write: the workspace PVC is mounted READ-ONLY on spec.workspace.mountPath (the job's
model, data and code are read from there), and only the job's own folder
`<mountPath>/.qtune/<job>-<uid8>` (layout.workspace_dir) is mounted read-write over it (same volume,
`subPath`), which is also the working directory; Python runs with PYTHONSAFEPATH (`-P`), so no
module is imported from the working directory or the script's folder by accident. The kubelet
creates a missing subPath directory itself (every missing component, with the mode, setgid bit
included, of the volume's root; pkg/volume/util/subpath SafeMakeDir), so with fsGroup the job folder
is group-writable for the pod's user wherever the volume's root is. The result secret reaches the pod
only through `secretKeyRef` of its own Secret: not in labels, annotations or the Pushgateway key.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from qtune import protocol
from qtune.operator import constants as c
from qtune.operator.config import OperatorConfig
from qtune.operator.layout import JobRef, job_document, metadata, pod_account, workspace_dir
from qtune.spec.models import JobSpec

CONTAINER = "runner"
INLINE_INPUTS_LIMIT = 32 * 1024
"""Inputs up to this many bytes travel in the unit's pod (annotations, a downwardAPI volume): the pod is then
created in the same round trip as the history is stored (qtune/operator/pods.py). Larger inputs (a tune config of a
very large space) get their own ConfigMap, written first; the pod objects every watcher holds stay small."""


@dataclass(frozen=True)
class UnitPlan:
    """One start of one unit, as the operator runs it (from the session's WorkUnit)."""

    unit: str
    attempt: int = 0
    trial: int | None = None
    tune_config: dict[str, Any] | None = None
    candidates: tuple[int, ...] = ()
    candidate_configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    full_evaluation: bool = False

    @property
    def kind(self) -> protocol.UnitKind:
        return protocol.unit_kind(self.unit) or protocol.UnitKind.TRIAL

    @property
    def role(self) -> str:
        """The pod's role label: its kind (c.ROLE_*)."""
        return self.kind.value

    def pod_name(self, job: JobRef) -> str:
        return c.unit_pod(job.name, self.unit, self.attempt)


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
    """The Intel Xeon pool's required affinity, narrowed by spec.trial.nodeAffinity (a Kubernetes NodeAffinity;
    bare nodeSelectorTerms are accepted as the required terms), never replaced: the pool's expressions are
    added to each of the job's required terms (terms are ORed, expressions within a term ANDed), so a job can
    only choose among the pool's nodes. The job's preferred terms are kept as they are (they only rank)."""
    default = default_node_affinity(config)
    override = spec.trial.node_affinity
    if not override:
        return default
    if "nodeSelectorTerms" in override:
        override = {"requiredDuringSchedulingIgnoredDuringExecution": override}
    pool = default["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"]
    out = {k: v for k, v in override.items() if k == "preferredDuringSchedulingIgnoredDuringExecution"}
    terms = (override.get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms") or []
    terms = [dict(term) for term in terms if isinstance(term, dict)] or [{}]
    for term in terms:
        term["matchExpressions"] = [*(term.get("matchExpressions") or []), *pool]
    out["requiredDuringSchedulingIgnoredDuringExecution"] = {"nodeSelectorTerms": terms}
    return out


def resources(spec: JobSpec, config: OperatorConfig | None = None) -> dict[str, Any]:
    """Guaranteed CPU and memory (requests = limits); ephemeral storage as the operator's settings say."""
    amount = {"cpu": str(spec.trial.resources.cpu), "memory": spec.trial.resources.memory}
    out = {"requests": dict(amount), "limits": dict(amount)}
    if config is not None and config.ephemeral_storage_request:
        out["requests"]["ephemeral-storage"] = config.ephemeral_storage_request
    if config is not None and config.ephemeral_storage_limit:
        out["limits"]["ephemeral-storage"] = config.ephemeral_storage_limit
    return out


def volume_mounts(job: JobRef, spec: JobSpec) -> list[dict[str, Any]]:
    """The PVC read-only on mountPath, the job's own folder of it read-write over it (subPath)."""
    job_folder = workspace_dir(spec, job)
    return [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "workspace", "mountPath": spec.workspace.mount_path, "readOnly": True},
        {"name": "workspace", "mountPath": job_folder,
         "subPath": posixpath.relpath(job_folder, spec.workspace.mount_path)},
        {"name": c.INPUTS_VOLUME, "mountPath": c.INPUT_MOUNT, "readOnly": True},
    ]


def _env(job: JobRef, spec: JobSpec, plan: UnitPlan, pod: str, config: OperatorConfig) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "QTUNE_JOB_UID", "value": job.uid},
        {"name": "QTUNE_JOB_NAME", "value": job.name},
        {"name": "QTUNE_UNIT", "value": plan.unit},
        {"name": "QTUNE_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "QTUNE_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "QTUNE_RESULT_SECRET",
         "valueFrom": {"secretKeyRef": {"name": c.unit_key(pod), "key": c.SECRET_KEY}}},
        # which start of the unit the Secret is for: the runner's write credential at the results gateway names it
        {"name": "QTUNE_UNIT_ATTEMPT", "value": str(plan.attempt)},
        {"name": "OMP_NUM_THREADS", "value": str(spec.trial.resources.cpu)},
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
        # never import from the working directory or sys.argv[0]'s folder (python -P), whatever
        # runner command the operator is configured with
        {"name": "PYTHONSAFEPATH", "value": "1"},
    ]
    if config.pushgateway_for_pods:
        env.append({"name": "QTUNE_PUSHGATEWAY_URL", "value": config.pushgateway_for_pods})
    env += [{"name": k, "value": v} for k, v in sorted(config.pod_env.items())]
    return env


def runner_args(job: JobRef, spec: JobSpec, plan: UnitPlan, config: OperatorConfig) -> list[str]:
    """`python -m qtune.runner <kind> ...`: every input is a file of the mounted inputs ConfigMap."""
    if plan.kind == protocol.UnitKind.CLEANUP:  # the models of trials not in plan.candidates leave the workspace
        return [plan.kind, "--workspace", workspace_dir(spec, job), "--keep", ",".join(map(str, plan.candidates))]
    args = [
        plan.kind,
        "--job", posixpath.join(c.INPUT_MOUNT, c.JOB_FILE),
        "--base-dir", spec.workspace.mount_path,
        "--workspace", workspace_dir(spec, job),
        "--threads", str(spec.trial.resources.cpu),
        "--job-uid", job.uid,
    ]
    if config.pushgateway_for_pods:
        args += ["--pushgateway", config.pushgateway_for_pods]
    if plan.kind == protocol.UnitKind.TRIAL:
        args += ["--index", str(plan.trial), "--config", posixpath.join(c.INPUT_MOUNT, c.CONFIG_FILE)]
        if plan.full_evaluation:
            args.append("--full-evaluation")
    elif plan.kind == protocol.UnitKind.CONFIRM:
        args += ["--candidates", ",".join(str(i) for i in plan.candidates),
                 "--config", posixpath.join(c.INPUT_MOUNT, c.CONFIG_FILE)]
    else:
        args += ["--publish-configmap", c.baseline_configmap(job.name)]
    return args


def _container(job: JobRef, spec: JobSpec, plan: UnitPlan, config: OperatorConfig, name: str) -> dict[str, Any]:
    """The unit pod's one container: the runner, as an unprivileged user on a read-only root."""
    image = spec.trial.image or config.trial_image
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "command": list(config.runner_command),
        "args": runner_args(job, spec, plan, config),
        "env": _env(job, spec, plan, name, config),
        "resources": resources(spec, config),
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
        "volumeMounts": volume_mounts(job, spec),
        "workingDir": workspace_dir(spec, job),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pull_policy = spec.trial.image_pull_policy or config.trial_image_pull_policy
    if pull_policy:
        container["imagePullPolicy"] = pull_policy
    return container


def unit_pod(job: JobRef, spec: JobSpec, plan: UnitPlan, config: OperatorConfig,
             annotations: dict[str, str] | None = None, inline: dict[str, str] | None = None) -> dict[str, Any]:
    """The pod running one start of a unit; `inline`: its input files, carried in its own annotations
    (`inline_inputs`), else they are in its inputs ConfigMap."""
    name = plan.pod_name(job)
    baseline = plan.kind == protocol.UnitKind.BASELINE
    timeout = int(spec.tuning.trial_timeout_seconds)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "activeDeadlineSeconds": int(protocol.unit_timeout_seconds(plan.kind, timeout)),
        # only the baseline pod talks to the API server (it publishes the tuning space)
        "automountServiceAccountToken": baseline,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": c.TRIAL_UID,
            "runAsGroup": c.TRIAL_UID,
            "fsGroup": c.TRIAL_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "affinity": {"nodeAffinity": node_affinity(spec, config)},
        "containers": [_container(job, spec, plan, config, name)],
        "volumes": [
            {"name": "tmp", "emptyDir": {"sizeLimit": config.tmp_size_limit} if config.tmp_size_limit else {}},
            {"name": "workspace",
             "persistentVolumeClaim": {"claimName": spec.workspace.persistent_volume_claim}},
            inputs_volume(name, inline),
        ],
    }
    pod_spec["serviceAccountName"] = pod_account(job, spec)
    if spec.trial.node_selector:
        pod_spec["nodeSelector"] = dict(spec.trial.node_selector)
    tolerations = spec.trial.tolerations or list(config.default_tolerations)
    if tolerations:
        pod_spec["tolerations"] = [dict(t) for t in tolerations]
    meta = metadata(job, name, plan.role, unit=plan.unit, attempt=plan.attempt, trial=plan.trial)
    if queue := spec.trial.queue_name or config.trial_queue_name:  # admitted by Kueue (docs/kueue.md)
        meta["labels"][c.KUEUE_QUEUE_LABEL] = queue
    annotations = {**(annotations or {}), **{c.input_annotation(file): text for file, text in (inline or {}).items()}}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def inputs_volume(pod: str, inline: dict[str, str] | None) -> dict[str, Any]:
    """The unit's input files: from the pod's own annotations (a downwardAPI volume) or its inputs ConfigMap.
    The runner reads the same files either way."""
    if inline is None:
        return {"name": c.INPUTS_VOLUME, "configMap": {"name": c.unit_inputs(pod)}}
    items = [{"path": file, "fieldRef": {"fieldPath": f"metadata.annotations['{c.input_annotation(file)}']"}}
             for file in sorted(inline)]
    return {"name": c.INPUTS_VOLUME, "downwardAPI": {"items": items}}


def inline_inputs(files: dict[str, str]) -> dict[str, str] | None:
    """`files` when they are small enough to travel in the pod itself (INLINE_INPUTS_LIMIT), else None: then
    they need their own ConfigMap, written before the pod."""
    size = sum(len(c.input_annotation(k)) + len(v.encode()) for k, v in files.items())
    return files if size <= INLINE_INPUTS_LIMIT else None


def unit_input_files(job: JobRef, spec_dict: dict[str, Any], plan: UnitPlan) -> dict[str, str]:
    """The files mounted into the unit's pod: job.json, and config.json (a trial's tune config; the
    confirmation's candidate configs by trial index). Plain JSON: the runner reads the files;
    raises protocol.PayloadTooLarge beyond what a ConfigMap holds."""
    data = {c.JOB_FILE: json.dumps(job_document(job, spec_dict), separators=(",", ":"), sort_keys=True)}
    if plan.kind == protocol.UnitKind.TRIAL:
        data[c.CONFIG_FILE] = json.dumps(plan.tune_config or {}, separators=(",", ":"), sort_keys=True)
    elif plan.kind == protocol.UnitKind.CONFIRM:
        data[c.CONFIG_FILE] = json.dumps(plan.candidate_configs, separators=(",", ":"), sort_keys=True)
    size = sum(len(k) + len(v.encode()) for k, v in data.items())
    if size > protocol.CONFIGMAP_LIMIT:
        raise protocol.PayloadTooLarge(f"the inputs of {plan.unit} are {size} bytes: more than a ConfigMap holds "
                                       f"({protocol.CONFIGMAP_LIMIT} bytes)")
    return data


def unit_inputs(job: JobRef, plan: UnitPlan, files: dict[str, str]) -> dict[str, Any]:
    """The inputs ConfigMap of inputs too large for the pod itself (`inline_inputs`)."""
    name = c.unit_inputs(plan.pod_name(job))
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": metadata(job, name, c.ROLE_INPUT, unit=plan.unit, attempt=plan.attempt), "data": dict(files)}


def unit_secret(job: JobRef, plan: UnitPlan, secret: str) -> dict[str, Any]:
    """The Secret only the unit's pod reads (env valueFrom secretKeyRef)."""
    name = c.unit_key(plan.pod_name(job))
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": metadata(job, name, c.ROLE_KEY, unit=plan.unit, attempt=plan.attempt),
            "stringData": {c.SECRET_KEY: secret}}


def configmap(job: JobRef, name: str, role: str, data: dict[str, str] | None = None,
              binary_data: dict[str, str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(job, name, role),
                            "data": dict(data or {})}
    if binary_data:
        body["binaryData"] = dict(binary_data)
    return body
