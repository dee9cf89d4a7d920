"""The janitor: what a job leaves behind goes, by the operator's cleanup policy (settings cleanup_failed_pods,
cleanup_trial_models, keep_succeeded_pods; chart `cleanup.*`).

* A recorded unit: its Pushgateway group first (kept while the Pushgateway cannot be reached), then its Secret,
  its inputs ConfigMap and, unless keep_succeeded_pods, its succeeded pod; once per process.

* Failed pods: the newest `cleanup_failed_pods` of a job are kept for `kubectl logs`/`describe`; older
  ones go once their failure is recorded (the reason and message stay in the history and status).
* Trial models: with keep-best (the default; a job's spec.workspace.trialModels wins), when a job
  ends a short `cleanup` pod (the trial image, the job's own workspace mount: the operator has no
  access to the PVC) runs `python -m qtune.runner cleanup --keep <winner and front>`, deleting the models
  of all other trials from the job's workspace folder (the configs on the accuracy-speed front keep theirs:
  a user may pick one of them without running it again).
* A finished job: every Pushgateway group of it. A deleted job's groups are swept later by a periodic task
  (qtune/operator/sweep.py); its pods, ConfigMaps and Secrets go by their ownerReferences.

The decisions are the pure functions; `Janitor` does the API calls for one job's loop (reconcile.py).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from qtune import protocol
from qtune.operator import builders
from qtune.operator import constants as c
from qtune.operator.attempts import plan_of
from qtune.operator.config import KEEP_ALL, KEEP_BEST, OperatorConfig
from qtune.operator.context import JobContext, gather_all
from qtune.operator.observe import recorded
from qtune.operator.pods import PodExecutor
from qtune.operator.podstatus import PodSummary
from qtune.operator.prom import MetricsError
from qtune.operator.rbac import ACCOUNT_FIELD, revoke_publishing
from qtune.spec.models import JobSpec
from qtune.tuning.front import session_front
from qtune.tuning.history import History
from qtune.tuning.session import TuningSession, WorkUnit

__all__ = ["KEEP_ALL", "KEEP_BEST", "Janitor", "cleanup_pod", "failed_pods_to_delete", "model_cleanup_unit",
           "trial_models_policy"]

logger = logging.getLogger(__name__)


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
    return WorkUnit(protocol.UnitKind.CLEANUP.value, protocol.UnitKind.CLEANUP, candidates=tuple(sorted(keep)))


def cleanup_pod(unit_pod: dict[str, Any]) -> dict[str, Any]:
    """A unit pod (builders.unit_pod of the cleanup unit) made self-contained: everything it needs is in its
    arguments, so it has no result Secret and no inputs ConfigMap (nothing is left behind but the finished
    pod, which goes with the job)."""
    body = copy.deepcopy(unit_pod)
    spec = body["spec"]
    spec["volumes"] = [v for v in spec.get("volumes", []) if v.get("name") != c.INPUTS_VOLUME]
    for container in spec["containers"]:
        container["volumeMounts"] = [m for m in container.get("volumeMounts", []) if m.get("name") != c.INPUTS_VOLUME]
        container["env"] = [e for e in container.get("env", [])
                            if "secretKeyRef" not in (e.get("valueFrom") or {})]
    return body


@dataclass
class Janitor:
    """One job's cleanup (its loop's last action each step)."""

    ctx: JobContext
    executor: PodExecutor
    cleaned: set[str] = field(default_factory=set)
    """Pods of recorded units already cleaned up (once per process)."""
    models_cleaned: int = -1
    """Trials the models cleanup was started for (once per finish in this process)."""
    revoked: bool = False
    """The job's publishing RoleBinding was deleted after its baseline was recorded (in this process)."""

    async def clean(self, history: History, pods: dict[str, PodSummary],
                    finished: TuningSession | None = None) -> None:
        """Pushgateway group, Secret, inputs and (succeeded) pod of every recorded unit, once; then the
        cleanup policy: old failed pods, and the models of non-winning trials once the job has `finished`."""
        await self._revoke_after_baseline(history)
        await gather_all(self._clean_unit(unit, pod) for unit, pod in pods.items()
                         if pod.name not in self.cleaned and recorded(history, unit) and pod.done)
        cleaned = [pod for pod in pods.values() if pod.name in self.cleaned]
        for pod in failed_pods_to_delete(cleaned, self.ctx.config.cleanup_failed_pods):
            await self.ctx.kube.delete_pod(self.ctx.job.namespace, pod.name)
        if finished is not None:
            await self._drop_spares(pods)
            await self._clean_models(pods, finished)

    async def _drop_spares(self, pods: dict[str, PodSummary]) -> None:
        """Once the job finished: the Secrets this process wrote ahead (qtune/operator/spares.py) that no pod uses.
        Only those: a Secret is never deleted by name unless this process created it (an earlier process's spare,
        which a restarted operator does not take, goes with the job: ownerReferences)."""
        ctx, spares = self.ctx, self.executor.spares
        used = {c.unit_key(name) for name in self.cleaned} | {c.unit_key(pod.name) for pod in pods.values()}
        names = sorted(spares.written - used)
        spares.written.clear()
        spares.ready.clear()
        await gather_all(ctx.kube.delete("Secret", ctx.job.namespace, name) for name in names)

    async def _revoke_after_baseline(self, history: History) -> None:
        """Once the baseline is recorded (its pod gone or not), the job's publishing right goes, once per process
        (rbac.revoke_publishing); a baseline that runs again gets it back when it starts (rbac.ensure_identity)."""
        if not recorded(history, protocol.UnitKind.BASELINE):
            self.revoked = False
        elif not self.revoked:
            await revoke_publishing(self.ctx.kube, self.ctx.job, self._account())
            self.revoked = True

    async def _clean_unit(self, unit: str, pod: PodSummary) -> None:
        """The recorded unit's result group first (kept while the Pushgateway cannot be reached), then its
        Secret, inputs and succeeded pod at once."""
        ctx, owned = self.ctx, self.executor.owned
        if ctx.services.pushgateway is not None:
            try:
                await ctx.services.pushgateway.delete_unit_groups(ctx.job.uid, unit)
            except MetricsError as exc:
                logger.warning("%s/%s: %s: %s", ctx.job.namespace, ctx.job.name, unit, exc)
                return

        async def delete_inputs() -> None:
            inputs = pod.inputs_configmap
            if inputs is None:  # they travelled in the pod
                return
            if inputs in owned or await ctx.read_owned(inputs) is not None:
                await ctx.kube.delete("ConfigMap", ctx.job.namespace, inputs)
            owned.discard(inputs)

        deletes = [ctx.kube.delete("Secret", ctx.job.namespace, c.unit_key(pod.name)), delete_inputs()]
        if pod.phase == "Succeeded" and not ctx.config.keep_succeeded_pods:
            deletes.append(ctx.kube.delete_pod(ctx.job.namespace, pod.name))
        await gather_all(deletes)
        self.cleaned.add(pod.name)

    async def _clean_models(self, pods: dict[str, PodSummary], finished: TuningSession) -> None:
        """Once per finish: the cleanup pod deleting the models of the trials neither the winner nor on the
        front (keep-best), unless one still runs."""
        ctx = self.ctx
        if ctx.spec is None or self.models_cleaned == len(finished.history.trials):
            return
        best = finished.best() if finished.ready else None
        front = [entry.trial for entry in session_front(finished)] if finished.ready else []
        unit = model_cleanup_unit(ctx.spec, ctx.config, best.index if best is not None else None, front)
        self.models_cleaned = len(finished.history.trials)
        running = pods.get(protocol.UnitKind.CLEANUP)
        if unit is not None and finished.history.trials and (running is None or running.done):
            attempt = self.executor.attempts.next(unit.id)
            body = cleanup_pod(builders.unit_pod(ctx.job, ctx.spec, plan_of(unit, attempt), ctx.config))
            if await ctx.kube.create_pod(body):
                logger.info("%s/%s: deleting the models of trials other than %s (pod %s)", ctx.job.namespace,
                            ctx.job.name, ",".join(map(str, unit.candidates)) or "none", body["metadata"]["name"])

    def _account(self) -> str | None:
        """The named account the job's pods ran as: the one pinned before its first pod (the spec may have been
        edited since), else the spec's."""
        pinned = self.ctx.history.pinned.get(ACCOUNT_FIELD) if self.ctx.history is not None else None
        if pinned is not None:
            return pinned or None
        return self.ctx.spec.trial.service_account_name if self.ctx.spec is not None else None

    async def revoke(self) -> None:
        """The failed job's publishing right, best effort (the garbage collector deletes it with the job)."""
        try:
            await revoke_publishing(self.ctx.kube, self.ctx.job, self._account())
        except Exception as exc:  # noqa: BLE001 - the job's failure is reported whatever this answers
            logger.warning("%s/%s: the job's RoleBinding stays until the job is deleted: %s", self.ctx.job.namespace,
                           self.ctx.job.name, exc)

    async def forget_job(self) -> None:
        """The finished job's publishing right (rbac.revoke_publishing) and Pushgateway groups, all of them (best
        effort: the sweep deletes what is left)."""
        ctx = self.ctx
        await revoke_publishing(ctx.kube, ctx.job, self._account())
        if ctx.services.pushgateway is not None:
            try:
                await ctx.services.pushgateway.delete_job_groups(ctx.job.uid)
            except MetricsError as exc:
                logger.warning("%s/%s: %s", ctx.job.namespace, ctx.job.name, exc)
