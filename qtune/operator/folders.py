"""A deleted job's folder on the workspace PVC (`<claim>/.qtune/<job>-<uid8>`: its trials' models, logs,
calibration cache) is deleted by a short pod, since the operator has no access to the PVC.

Jobs carry no finalizer (deleting one never waits for the operator), so the folder goes AFTER the job: when
the operator sees the job's DELETED event (handlers.job_deleted) and the setting
cleanup_deleted_job_folders is on (chart `cleanup.deletedJobFolders`, default true), it creates one pod in
the job's namespace that mounts only the claim's `.qtune` folder and runs `python -m qtune.runner cleanup
--jobs-root ... --remove-job-folder <job>-<uid8>`. The pod has no ownerReference (its job is gone: the
garbage collector would delete it at once) but the operator's labels (role `folder-cleanup`, the job's
name, its uid as `qtune.io/deleted-job-uid`: not `qtune.io/job-uid`, so nothing takes it for a pod of a live
job); it runs the operator's trial image (never the job's `spec.trial.image`), without an API token, and
`handlers.folder_cleanup_pod_changed` deletes it once it succeeded (a failed one stays for `kubectl logs`).

The folder name is the one the operator assigned the job (qtune.protocol.job_folder) and is checked twice
(here and by the runner, qtune.protocol.is_job_folder): never a path, a parent or `..`.

Not covered: a job deleted while no operator ran (nobody saw its DELETED event) keeps its folder; so does one
whose spec no longer names a claim. Such folders are `.qtune/<job>-<uid8>` folders of no live job (compare
with `kubectl get qj -A -o custom-columns=NAME:.metadata.name,UID:.metadata.uid`); delete them by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from qtune import protocol
from qtune.operator import builders
from qtune.operator import constants as c
from qtune.operator.config import OperatorConfig
from qtune.operator.layout import JobRef
from qtune.operator.reconcile import validate
from qtune.spec.errors import SpecError
from qtune.spec.models import JobSpec

logger = logging.getLogger(__name__)

ROLE_FOLDER_CLEANUP = "folder-cleanup"
JOBS_MOUNT = "/qtune-jobs"
"""Where the folder cleanup pod mounts the claim's `.qtune` folder (subPath): nothing else of the claim."""
LABEL_DELETED_JOB_UID = f"{c.GROUP}/deleted-job-uid"
DEADLINE_SECONDS = 600
RESOURCES = {"cpu": "100m", "memory": "256Mi"}


def pod_name(job: JobRef) -> str:
    """One per job object (the uid): a job created again under the same name gets its own."""
    return f"qtune-folder-cleanup-{job.uid}"


def folder_cleanup_pod(job: JobRef, spec: JobSpec, config: OperatorConfig) -> dict[str, Any]:
    """The pod deleting the job's folder from its workspace claim. Raises ValueError when the job's folder
    name is not one the operator assigns (then nothing is deleted)."""
    folder = protocol.job_folder(job.name, job.uid)
    if not protocol.is_job_folder(folder):
        raise ValueError(f"{folder!r} is not a job folder's name: not deleting it")
    security = {"runAsNonRoot": True, "runAsUser": c.TRIAL_UID, "runAsGroup": c.TRIAL_UID,
                "seccompProfile": {"type": "RuntimeDefault"}}
    container: dict[str, Any] = {
        "name": builders.CONTAINER,
        "image": config.trial_image,
        "command": list(config.runner_command),
        "args": [protocol.UnitKind.CLEANUP.value, "--jobs-root", JOBS_MOUNT, "--remove-job-folder", folder],
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
                {"name": "PYTHONSAFEPATH", "value": "1"}],
        "resources": {"requests": dict(RESOURCES), "limits": dict(RESOURCES)},
        "securityContext": {**security, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "privileged": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                         {"name": "workspace", "mountPath": JOBS_MOUNT, "subPath": protocol.JOBS_FOLDER}],
        "workingDir": "/tmp",
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if config.trial_image_pull_policy:
        container["imagePullPolicy"] = config.trial_image_pull_policy
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "activeDeadlineSeconds": DEADLINE_SECONDS,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {**security, "fsGroup": c.TRIAL_UID},
        # where the job's units could run, so a claim bound to that pool's nodes can be mounted
        "affinity": {"nodeAffinity": builders.node_affinity(spec, config)},
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                    {"name": "workspace",
                     "persistentVolumeClaim": {"claimName": spec.workspace.persistent_volume_claim}}],
    }
    if spec.trial.node_selector:
        pod_spec["nodeSelector"] = dict(spec.trial.node_selector)
    tolerations = spec.trial.tolerations or list(config.default_tolerations)
    if tolerations:
        pod_spec["tolerations"] = [dict(t) for t in tolerations]
    tags = {c.LABEL_JOB: job.name, c.LABEL_ROLE: ROLE_FOLDER_CLEANUP, c.LABEL_MANAGED_BY: c.MANAGED_BY,
            LABEL_DELETED_JOB_UID: job.uid}
    meta = {"name": pod_name(job), "namespace": job.namespace, "labels": tags}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def deleted_job_cleanup(body: Mapping[str, Any], config: OperatorConfig) -> dict[str, Any] | None:
    """The folder cleanup pod for the deleted job `body` (its last state), or None: the setting is off, or the
    spec names no claim or is invalid (its units never ran), or the folder name is not one the operator
    assigns. Every None is logged with why."""
    if not config.cleanup_deleted_job_folders:
        return None
    job = JobRef.from_body(body)
    try:
        spec, _ = validate(body)
        return folder_cleanup_pod(job, spec, config)
    except (SpecError, ValueError) as exc:
        logger.info("%s/%s: its folder on the workspace claim is not deleted: %s", job.namespace, job.name, exc)
        return None


def after_folder_cleanup(pod: Mapping[str, Any]) -> str | None:
    """What to do with a folder cleanup pod: "delete" once it succeeded, "keep" a failed one (its log says
    why; `kubectl delete pod` it), None while it runs."""
    phase = (pod.get("status") or {}).get("phase")
    return {"Succeeded": "delete", "Failed": "keep"}.get(str(phase))
