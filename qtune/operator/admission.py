"""What a job may choose of its pods, as the operator's settings bound it (one operator serves many tenants).

A QuantizationJob becomes pods, so what the job names is checked before any pod exists, and a job that asks
for what is not allowed fails InvalidSpec naming the field and what is allowed:

- spec.trial.image: the operator's trial image, or one of `allowed_images` (exact, or prefix patterns ending
  in '*');
- spec.workspace.persistentVolumeClaim: a PVC of the job's namespace carrying `workspace_claim_label`
  (opted in by the namespace's administrator; the operator reads the PVC);
- spec.trial.tolerations: only taint keys of `allowed_toleration_keys`;
- placement needs no allow-list: the job's nodeAffinity and nodeSelector only narrow the operator's Xeon-pool
  affinity (builders.node_affinity ANDs them), never replace it.

The image, the workspace claim and the ServiceAccount are fixed once the job's first pod may start: the CRD
refuses an edit (transition rules), and the operator refuses it too (for a CRD of an older release) by
comparing with the values it pinned in the job's history before the first pod.
"""

from __future__ import annotations

from typing import Any, Protocol

from qtune.operator.config import OperatorConfig, matches_pattern
from qtune.operator.layout import JobRef
from qtune.operator.rbac import ACCOUNT_FIELD
from qtune.spec.errors import SpecError
from qtune.spec.models import JobSpec
from qtune.tuning.history import History

IMAGE_FIELD = "spec.trial.image"
CLAIM_FIELD = "spec.workspace.persistentVolumeClaim"
TOLERATIONS_FIELD = "spec.trial.tolerations"
ADMIN_HINT = "ask the operator's administrator"


class ObjectReader(Protocol):
    async def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None: ...


def check_image(spec: JobSpec, config: OperatorConfig) -> None:
    """SpecError unless spec.trial.image is unset, the operator's trial image, or an allowed one."""
    image = spec.trial.image
    if not image or image == config.trial_image:
        return
    allowed = config.allowed_images or (config.trial_image,)
    if not matches_pattern(image, allowed):
        raise SpecError(IMAGE_FIELD, f"image {image!r} is not one the operator allows (allowed: "
                                     f"{', '.join(allowed)}); leave the field out to use {config.trial_image}, "
                                     f"or {ADMIN_HINT} to allow it (setting QTUNE_ALLOWED_IMAGES, chart value "
                                     "trial.allowedImages)")


def check_tolerations(spec: JobSpec, config: OperatorConfig) -> None:
    """SpecError naming the first toleration whose taint key is not allowed (a toleration without a key
    tolerates every taint: allowed only by the pattern '*')."""
    allowed = config.allowed_toleration_keys
    for index, toleration in enumerate(spec.trial.tolerations):
        key = str(toleration.get("key") or "")
        if (key and matches_pattern(key, allowed)) or (not key and "*" in allowed):
            continue
        what = f"taint key {key!r}" if key else "every taint (a toleration without a key)"
        now = ", ".join(allowed) if allowed else "none"
        raise SpecError(f"{TOLERATIONS_FIELD}[{index}]",
                        f"tolerates {what}, which the operator does not allow (allowed taint keys: {now}); "
                        f"remove it, or {ADMIN_HINT} to allow the key (setting QTUNE_ALLOWED_TOLERATION_KEYS, "
                        "chart value trial.allowedTolerationKeys)")


def check_choices(spec: JobSpec, config: OperatorConfig) -> None:
    """The checks that need no API call (image, tolerations)."""
    check_image(spec, config)
    check_tolerations(spec, config)


async def check_claim(kube: ObjectReader, job: JobRef, spec: JobSpec, config: OperatorConfig) -> None:
    """SpecError unless the workspace PVC exists in the job's namespace and carries the opt-in label."""
    name = spec.workspace.persistent_volume_claim
    if not config.workspace_claim_label or not name:
        return
    key, _, value = config.workspace_claim_label.partition("=")
    how = (f"a PVC of namespace {job.namespace} may be a job's workspace only when its administrator labels it "
           f"{key}={value!r} (kubectl label pvc <name> {key}={value})")
    body = await kube.read("PersistentVolumeClaim", job.namespace, name)
    if body is None:
        raise SpecError(CLAIM_FIELD, f"PVC {name!r} does not exist in namespace {job.namespace}; {how}")
    labels = (body.get("metadata") or {}).get("labels") or {}
    if labels.get(key) != value:
        raise SpecError(CLAIM_FIELD, f"PVC {name!r} is not opted in as a workspace (label {key} is "
                                     f"{labels.get(key)!r}); {how}")


def pinned_choices(spec: JobSpec) -> dict[str, str]:
    """What cannot change once the job's first pod may start ("" = unset: the operator's default)."""
    return {IMAGE_FIELD: spec.trial.image or "", CLAIM_FIELD: spec.workspace.persistent_volume_claim or "",
            ACCOUNT_FIELD: spec.trial.service_account_name or ""}


def pin(history: History, spec: JobSpec) -> bool:
    """Remember the spec's pinned choices in the history the first time (True: the history changed and must be
    stored before any pod starts); afterwards raise SpecError on the first one that changed."""
    wanted = pinned_choices(spec)
    for name, first in history.pinned.items():
        now = wanted.get(name, "")
        if now != first:
            raise SpecError(name, f"the job's pods were created with {_shown(first)} and the spec now asks for "
                                  f"{_shown(now)}: this field cannot change once the job started; set it back, or "
                                  "create a new QuantizationJob")
    missing = {name: value for name, value in wanted.items() if name not in history.pinned}
    history.pinned.update(missing)
    return bool(missing)


def _shown(value: str) -> str:
    return repr(value) if value else "none (the operator's default)"
