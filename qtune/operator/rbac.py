"""The RBAC objects the operator creates per job: the baseline pod's right to publish the tuning
space to the job's baseline ConfigMap, and nothing more."""

from __future__ import annotations

from typing import Any

from qtune.operator import constants as c
from qtune.operator.layout import JobRef, metadata


def runner_rbac(job: JobRef, account: str | None = None) -> list[dict[str, Any]]:
    """Role + RoleBinding letting the baseline pod's ServiceAccount get/update/patch the job's
    baseline ConfigMap only (the operator creates that ConfigMap empty beforehand); plus the
    per-job ServiceAccount `<job>-runner` unless the job names its own (spec.trial.serviceAccountName)."""
    name = c.runner_account(job.name)
    objects: list[dict[str, Any]] = []
    if not account:
        objects.append({"apiVersion": "v1", "kind": "ServiceAccount",
                        "metadata": metadata(job, name, c.ROLE_BASELINE)})
    objects += [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": metadata(job, name, c.ROLE_BASELINE),
         "rules": [{"apiGroups": [""], "resources": ["configmaps"],
                    "resourceNames": [c.baseline_configmap(job.name)],
                    "verbs": ["get", "update", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": metadata(job, name, c.ROLE_BASELINE),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": account or name, "namespace": job.namespace}]},
    ]
    return objects
