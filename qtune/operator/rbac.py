"""Who a job's pods run as, and the RBAC objects the operator creates per job.

Every pod of a job runs as the job's own ServiceAccount `<job>-runner` (generated, owned by the
job, no rights but the baseline pod's right to publish the tuning space to the job's baseline
ConfigMap), or as the account the job names in spec.trial.serviceAccountName, which must exist
already and be opted in by the namespace's administrator (label `qtune.io/job-account: "true"`):
the operator never creates or changes a named account, so a job cannot borrow a workload's
identity. An existing object of a generated name is used only when the job's uid owns it
(ForeignObject otherwise: ObjectConflict, or WaitingForCleanup for an earlier job's).

The publishing right lives only while the job's baseline may run: the RoleBinding is created when a baseline
pod is about to start and deleted once the baseline is recorded and when the job ends (the garbage collector
deletes it with the job too). A named account's binding has one name per account (`qtune-publish-<account>`,
owned by the job whose baseline publishes): while one job holds it, the baseline of another job of the same
account waits (WaitingForAccount). So jobs whose pods share one opted-in account never accumulate rights over
each other's `<job>-baseline` ConfigMaps: at any moment the account may write one job's at most.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

from qtune.operator import constants as c
from qtune.operator.kube import Conflict
from qtune.operator.layout import JobRef, metadata, pod_account
from qtune.operator.store import OWNED, ForeignObject, check_owned, ownership
from qtune.spec.errors import SpecError
from qtune.spec.models import JobSpec

ACCOUNT_FIELD = "spec.trial.serviceAccountName"
WAITING_FOR_ACCOUNT = "WaitingForAccount"


class AccountBusy(ForeignObject):
    """The named account's publishing RoleBinding is held by another job's baseline: wait until it is recorded."""

    def __init__(self, job: JobRef, account: str, body: dict[str, Any]) -> None:
        name = str((body.get("metadata") or {}).get("name", ""))
        super().__init__("RoleBinding", job.namespace, name, previous=True)
        holders = [str(ref.get("name")) for ref in (body.get("metadata") or {}).get("ownerReferences") or []]
        self.reason = WAITING_FOR_ACCOUNT
        self.message = (f"ServiceAccount {account} publishes the baseline of job {', '.join(holders) or '?'} now "
                        f"(RoleBinding {job.namespace}/{name}): one baseline at a time per shared account, so no job "
                        "of it may write another's baseline ConfigMap; this job's baseline starts once that one "
                        "is recorded")


def binding_name(job: JobRef, account: str | None) -> str:
    """The job's RoleBinding: `<job>-runner` for its own account, one name per named account (one holder)."""
    if not account:
        return c.runner_account(job.name)
    name = f"qtune-publish-{account}"
    return name if len(name) <= 253 else f"qtune-publish-{hashlib.sha256(account.encode()).hexdigest()[:16]}"


class ObjectApi(Protocol):
    async def ensure(self, body: dict[str, Any]) -> bool: ...

    async def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def delete(self, kind: str, namespace: str, name: str) -> bool: ...


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
         "metadata": metadata(job, binding_name(job, account), c.ROLE_BASELINE),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": account or name, "namespace": job.namespace}]},
    ]
    return objects


def check_named_account(body: dict[str, Any] | None, job: JobRef, name: str) -> None:
    """SpecError on spec.trial.serviceAccountName unless the named account exists and is opted in."""
    allowed = (f"name a ServiceAccount of namespace {job.namespace} labelled {c.JOB_ACCOUNT_LABEL}="
               f"\"{c.JOB_ACCOUNT_VALUE}\" by its administrator, or leave the field out (the job's pods then run "
               f"as the job's own account {c.runner_account(job.name)})")
    if body is None:
        raise SpecError(ACCOUNT_FIELD, f"ServiceAccount {name!r} does not exist (the operator never creates a named "
                                       f"account); {allowed}")
    labels = (body.get("metadata") or {}).get("labels") or {}
    if labels.get(c.JOB_ACCOUNT_LABEL) != c.JOB_ACCOUNT_VALUE:
        raise SpecError(ACCOUNT_FIELD, f"ServiceAccount {name!r} is not opted in to run qtune jobs (label "
                                       f"{c.JOB_ACCOUNT_LABEL} is {labels.get(c.JOB_ACCOUNT_LABEL)!r}); {allowed}")


async def ensure_identity(kube: ObjectApi, job: JobRef, spec: JobSpec, publish: bool = True) -> str:
    """Make sure the account the job's pods run as may be used, creating the job's own objects
    (ServiceAccount unless one is named; the Role and RoleBinding only when `publish`: a baseline pod is about
    to start); returns the account's name.

    Raises SpecError (spec.trial.serviceAccountName) for a missing or not opted-in named account, and
    store.ForeignObject when an object of a generated name exists that the job's uid does not own:
    a 409 is never taken for success."""
    named = spec.trial.service_account_name
    if named:
        check_named_account(await kube.read("ServiceAccount", job.namespace, named), job, named)
    for body in runner_rbac(job, named):
        if body["kind"] != "ServiceAccount" and not publish:
            continue
        if await kube.ensure(body):
            continue
        kind, name = body["kind"], body["metadata"]["name"]
        existing = await kube.read(kind, job.namespace, name)
        if existing is None:  # deleted in between: the next step creates it
            raise Conflict(f"{kind.lower()} {name} vanished")
        existing.setdefault("kind", kind)
        if kind == "RoleBinding" and named and ownership(existing, job) != OWNED and _held_by_a_job(existing):
            raise AccountBusy(job, named, existing)
        check_owned(existing, job)
        if kind == "RoleBinding" and existing.get("subjects") != body["subjects"]:
            _account_changed(job, existing, body)
    return pod_account(job, spec)


def _account_changed(job: JobRef, existing: dict[str, Any], wanted: dict[str, Any]) -> None:
    """The job's RoleBinding names another account than the spec now does: the account is fixed when the
    job's first pod starts (the operator may create RoleBindings, never change one: it holds no update right
    on them), so a changed spec.trial.serviceAccountName is refused, naming both accounts."""
    def names(body: dict[str, Any]) -> str:
        return ", ".join(str(s.get("name")) for s in body.get("subjects") or []) or "none"

    raise SpecError(ACCOUNT_FIELD, f"the job's pods run as ServiceAccount {names(existing)} (RoleBinding "
                                   f"{job.namespace}/{existing['metadata'].get('name')}) and the spec now asks for "
                                   f"{names(wanted)}: the account of a job's pods cannot change once they ran; set "
                                   "the field back, or create a new job for the other account")


def _held_by_a_job(body: dict[str, Any]) -> bool:
    refs = (body.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("kind") == c.KIND and str(ref.get("apiVersion", "")).startswith(c.GROUP + "/") for ref in refs)


async def revoke_publishing(kube: ObjectApi, job: JobRef, account: str | None) -> bool:
    """Delete the job's RoleBinding (the baseline is recorded, or the job ended): the account its pods run as
    keeps no right over the job's baseline ConfigMap, and the next job of a shared account may publish. Only
    the job's own binding is deleted (a named account's may be another job's). True when one was deleted."""
    name = binding_name(job, account)
    body = await kube.read("RoleBinding", job.namespace, name)
    if body is None or ownership(body, job) != OWNED:
        return False
    return await kube.delete("RoleBinding", job.namespace, name)
