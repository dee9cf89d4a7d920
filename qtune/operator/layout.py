"""Where a job's things live: its identity, labels, owner reference, workspace folders.

Pure functions of the job (no API calls), shared by the builders, the reconciler and the status.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

from qtune import protocol
from qtune.operator import constants as c
from qtune.spec.errors import SpecError
from qtune.spec.models import JobSpec


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


def labels(job: JobRef, role: str, unit: str | None = None, attempt: int | None = None,
           trial: int | None = None) -> dict[str, str]:
    out = {
        c.LABEL_JOB: job.name,
        c.LABEL_JOB_UID: job.uid,
        c.LABEL_ROLE: role,
        c.LABEL_MANAGED_BY: c.MANAGED_BY,
    }
    if unit is not None:
        out[c.LABEL_UNIT] = unit
    if attempt is not None:
        out[c.LABEL_ATTEMPT] = str(attempt)
    if trial is not None:
        out[c.LABEL_TRIAL] = str(trial)
    return out


def metadata(job: JobRef, name: str, role: str, **label_args: Any) -> dict[str, Any]:
    """Metadata of an object the operator creates for a job: owned by it, labelled."""
    return {"name": name, "namespace": job.namespace, "labels": labels(job, role, **label_args),
            "ownerReferences": [owner_reference(job)]}


def cluster_problem(spec: JobSpec) -> SpecError | None:
    """What the cluster needs beyond a valid spec; None when the job can run on the cluster."""
    if not spec.workspace.persistent_volume_claim:
        return SpecError("spec.workspace.persistentVolumeClaim",
                         "required on the cluster: the PVC that holds the model and data "
                         "(the job's relative paths resolve against spec.workspace.mountPath)")
    return None


def workspace_dir(spec: JobSpec, job: JobRef) -> str:
    """The job's workspace inside the pods: one folder per job object on the PVC."""
    return posixpath.join(spec.workspace.mount_path, protocol.JOBS_FOLDER, protocol.job_folder(job.name, job.uid))


def pod_account(job: JobRef, spec: JobSpec) -> str:
    """The ServiceAccount every pod of the job runs as: the named one (checked to be opted in,
    qtune/operator/rbac.py) or the job's own."""
    return spec.trial.service_account_name or c.runner_account(job.name)


def trial_dir(spec: JobSpec, job: JobRef, index: int) -> str:
    return posixpath.join(workspace_dir(spec, job), "trials", str(index))


def job_document(job: JobRef, spec: dict[str, Any]) -> dict[str, Any]:
    """The QuantizationJob the runner reads (spec as stored, server defaults applied)."""
    return {"apiVersion": c.API_VERSION, "kind": c.KIND,
            "metadata": {"name": job.name, "namespace": job.namespace}, "spec": spec}
