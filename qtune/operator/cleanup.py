"""The operator's cleanup policy (settings cleanup_failed_pods, cleanup_trial_models; chart `cleanup.*`).

* Failed pods: the newest `cleanup_failed_pods` of a job are kept for `kubectl logs`/`describe`; older
  ones go once their failure is recorded (the reason and message stay in the history and status).
* Trial models: with keep-best (the default; a job's spec.workspace.trialModels wins), when a job
  ends a short `cleanup` pod (the trial image, the job's own workspace mount: the operator has no
  access to the PVC) runs `python -m qtune.runner cleanup --keep <winner and front>`, deleting the models
  of all other trials from the job's workspace folder (the configs on the accuracy-speed front keep theirs:
  a user may pick one of them without running it again).

Pure decisions here; reconcile.py does the API calls.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from qtune import protocol
from qtune.operator.config import KEEP_ALL, KEEP_BEST, OperatorConfig
from qtune.operator.podstatus import PodSummary
from qtune.spec.models import JobSpec
from qtune.tuning.session import WorkUnit

__all__ = ["KEEP_ALL", "KEEP_BEST", "cleanup_pod", "failed_pods_to_delete", "model_cleanup_unit",
           "trial_models_policy"]

INPUTS_VOLUME = "inputs"


def failed_pods_to_delete(pods: Iterable[PodSummary], keep: int) -> list[PodSummary]:
    """The failed pods beyond the newest `keep` (by when they ended, then name), oldest last."""
    failed = [pod for pod in pods if pod.phase == "Failed" and not pod.deleting]
    failed.sort(key=lambda pod: (pod.finished or pod.started or pod.created or 0.0, pod.name), reverse=True)
    return failed[max(0, keep):]


def trial_models_policy(spec: JobSpec, config: OperatorConfig) -> str:
    return spec.workspace.trial_models or config.cleanup_trial_models


def model_cleanup_unit(spec: JobSpec, config: OperatorConfig, best: int | None,
                       front: Iterable[int] = ()) -> WorkUnit | None:
    """The cleanup unit to run once a job ended (keeping the models of the winner and of the configs on the
    accuracy-speed front), None with keep-all."""
    if trial_models_policy(spec, config) != KEEP_BEST:
        return None
    keep = {int(i) for i in front} | ({int(best)} if best is not None else set())
    return WorkUnit(protocol.CLEANUP_UNIT, protocol.CLEANUP_UNIT, candidates=tuple(sorted(keep)))


def cleanup_pod(unit_pod: dict[str, Any]) -> dict[str, Any]:
    """A unit pod (builders.unit_pod of the cleanup unit) made self-contained: everything it needs is in its
    arguments, so it has no result Secret and no inputs ConfigMap (nothing is left behind but the finished
    pod, which goes with the job)."""
    body = copy.deepcopy(unit_pod)
    spec = body["spec"]
    spec["volumes"] = [v for v in spec.get("volumes", []) if v.get("name") != INPUTS_VOLUME]
    for container in spec["containers"]:
        container["volumeMounts"] = [m for m in container.get("volumeMounts", []) if m.get("name") != INPUTS_VOLUME]
        container["env"] = [e for e in container.get("env", [])
                            if "secretKeyRef" not in (e.get("valueFrom") or {})]
    return body
