"""The pod executor: starts, cancels and observes a job's units as pods.

* observe: the job's current pods (one per unit, the newest attempt), pods no node will finish force-deleted
  (`reap`: stuck terminating, on a lost node (qtune/operator/nodes.py), their container lost), the results
  (the operator-wide poller's snapshot, Prometheus when a succeeded unit's result is missing), then the pure
  `observe` (qtune/operator/observe.py); pods this process created that the pod index does not show yet still
  run (`expect`).
* start: the job's ServiceAccount checked, the history saved with each start's attempt (`History.attempts`: a
  restarted operator never issues a unit secret twice), then each start's Secret and, when its inputs are too
  large for the pod, its inputs ConfigMap written (a new attempt, stored first, when a Secret of that name exists:
  one the operator did not just create is never used); the pods only once they are written. What the pod looks like
  is the builders' (qtune/operator/builders.py). The next trial's Secret is written ahead (qtune/operator/spares.py):
  its start then stores the history and creates the pod in one round trip.
* cancel: pods of units the session cancelled, pods past their time limit.

Every action is idempotent (deterministic names, 409/404 tolerated).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any

from qtune import protocol
from qtune.operator import builders
from qtune.operator import constants as c
from qtune.operator import status as st
from qtune.operator.attempts import Attempts, plan_of
from qtune.operator.context import JobContext, Terminal, gather_all
from qtune.operator.kube import Conflict
from qtune.operator.nodes import NodeHealth
from qtune.operator.observe import Limits, Observation, observe, recorded
from qtune.operator.podstatus import PodSummary, summarize_pod
from qtune.operator.prom import MetricsError
from qtune.operator.rbac import ensure_identity
from qtune.operator.results import ACCEPT, Observed, judge, terminated_result, unit_pods
from qtune.operator.spaces import SpaceLoader
from qtune.operator.spares import Spares
from qtune.operator.store import OWNED, ForeignObject, ownership
from qtune.spec.errors import SpecError
from qtune.tuning.history import History
from qtune.tuning.session import WorkUnit
from qtune.tuning.space import TuningSpace

logger = logging.getLogger(__name__)

SECRET_TRIES = 3
"""Attempts whose unit Secret already existed before a unit start gives up (ObjectConflict)."""
EXPECTATION_SECONDS = 60.0
"""How long a pod this process created counts as running while the pod index does not show it yet."""

Start = tuple[builders.UnitPlan, dict[str, Any]]
"""A prepared start: its plan and its pod's body."""


@dataclass
class ResultWatch:
    """Units whose succeeded pods wait for their results, and the last error of a results query."""

    awaiting: dict[str, float] = field(default_factory=dict)
    """unit -> when its finished pod started waiting for its result (this process's clock)."""
    error: str | None = None
    """The last error of a results query (the job's own or the operator-wide poller's); None once one worked."""
    terminated: dict[str, Observed | None] = field(default_factory=dict)
    """pod uid -> the signed result in its termination message (None: none there), decoded once per pod."""


@dataclass
class PodExecutor:
    ctx: JobContext
    nodes: NodeHealth = field(init=False)
    spaces: SpaceLoader = field(init=False)
    """The space the baseline published, decoded once its signed hash matches (read again by a restart)."""
    attempts: Attempts = field(default_factory=Attempts)
    results: ResultWatch = field(default_factory=ResultWatch)
    owned: set[str] = field(default_factory=set)
    """ConfigMaps this process created or found owned by the job's uid (deletable without a read)."""
    identity: tuple[int | None, str] | None = None
    """(generation, ServiceAccount) whose use by the job's pods was checked (rbac.ensure_identity)."""
    spares: Spares = field(init=False)
    """The next trial's Secret, written ahead (qtune/operator/spares.py)."""
    save_with_pods: bool = False
    """The history of this step is stored with its pods (`start`), not before: every start's Secret was written
    ahead and its inputs travel in its pod."""

    def __post_init__(self) -> None:
        self.nodes = NodeHealth(self.ctx)
        self.spaces = SpaceLoader(self.ctx.config.space_limit_bytes, self.ctx.config.space_limit_elements)
        self.spares = Spares(self.ctx)

    # ----------------------------------------------------------------------------------------
    # observe
    def current(self, pods: Iterable[PodSummary]) -> dict[str, PodSummary]:
        """unit -> its current pod (retired pods left out)."""
        return unit_pods(self.ctx.job, [p for p in pods if p.uid not in self.attempts.retired])

    async def retire(self, unit: str, failed: PodSummary) -> None:
        """A failed pod whose failure is history (the baseline runs again): the next start is a new attempt."""
        self.attempts.retired.add(failed.uid)
        self.attempts.seen(unit, failed.attempt)
        await self.ctx.kube.delete_pod(self.ctx.job.namespace, failed.name)

    async def observe(self, pods: list[PodSummary], current: dict[str, PodSummary], history: History,
                      now: float) -> Observation:
        """What the cluster says about each unit (`current` loses the pods force-deleted here)."""
        ctx = self.ctx
        for unit, pod in current.items():
            self.attempts.seen(unit, pod.attempt)
        await self.reap([p for p in pods if p.owned_by(ctx.job.namespace, ctx.job.uid)], current, now)
        results = await self._results(current, history)
        space = None
        baseline = protocol.UnitKind.BASELINE.value
        baseline_pod = current.get(baseline)
        if baseline_pod is not None and baseline_pod.phase == "Succeeded" and not recorded(history, baseline):
            space = await self.published_space(results.get(baseline), baseline_pod)
        assert ctx.spec is not None
        limits = Limits(ctx.config.results_deadline_seconds, float(ctx.spec.tuning.trial_timeout_seconds),
                        ctx.config.trial_grace_seconds)
        seen = observe(ctx.job, history, current, results, space, ctx.config.signing_key,
                       self.results.awaiting, now, limits)
        self.expect(current, history, seen.running, now)
        return seen

    async def published_space(self, observed: Observed | None, pod: PodSummary) -> TuningSpace | None:
        """The space the baseline published, read only once its succeeded result is accepted (signature verified)
        and decoded only when the stored value has the hash that result names (qtune/operator/spaces.py): nothing
        the job's code wrote there is inflated or parsed before."""
        ctx = self.ctx
        if observed is None or not isinstance(observed.result, protocol.BaselineResult) or \
                observed.result.status != protocol.SUCCEEDED or \
                judge(ctx.job, observed, pod, ctx.config.signing_key) != ACCEPT:
            return None
        published = await ctx.read_owned(c.baseline_configmap(ctx.job.name))
        return self.spaces.load(published, observed.result.space_sha256)

    async def reap(self, owned: list[PodSummary], current: dict[str, PodSummary], now: float) -> None:
        """Force-delete (grace 0) the job's pods that no node will ever finish: stuck terminating past their
        grace period plus a margin, or on a node that is gone or NotReady too long (their status may say
        Running forever), or failed because their node lost the container (a node back from a reboot says
        ContainerStatusUnknown). A unit whose current pod goes so is not running: the session starts it again as
        a new attempt, and no trial is failed for it. Only pods the job owns (ownerReferences uid) are ever
        touched."""
        ctx = self.ctx
        margin = ctx.config.terminating_margin_seconds
        for pod in owned:
            if pod.done or not pod.deleting or pod.deleted_at is None or now - pod.deleted_at <= margin:
                continue
            logger.warning("%s/%s: pod %s still terminating %.0fs after its grace period (node %s): force-deleting "
                           "it", ctx.job.namespace, ctx.job.name, pod.name, now - pod.deleted_at, pod.node)
            await ctx.kube.delete_pod(ctx.job.namespace, pod.name, grace_seconds=0)
            ctx.events("Warning", "PodForceDeleted", f"pod {pod.name} was stuck terminating on node {pod.node} "
                                                     "past its grace period: force-deleted")
            if current.get(pod.unit) is pod:
                current.pop(pod.unit)
        for unit, pod in list(current.items()):
            if pod.lost_container and not pod.deleting:
                lost: str | None = f"node {pod.node} lost its container ({pod.container_reason})"
            elif pod.done or pod.deleting or not pod.node:
                continue
            else:
                lost = await self.nodes.lost(pod.node, now)
            if lost is not None:
                await self._replace(unit, pod, lost, current)

    async def _replace(self, unit: str, pod: PodSummary, why: str, current: dict[str, PodSummary]) -> None:
        """Force-delete `unit`'s current pod, lost for `why`: the unit is no longer running (no pod of this process
        is still expected to show up for it, as this one was seen), so the session starts it again."""
        ctx = self.ctx
        logger.warning("%s/%s: %s: force-deleting pod %s; %s starts again", ctx.job.namespace, ctx.job.name, why,
                       pod.name, unit)
        await ctx.kube.delete_pod(ctx.job.namespace, pod.name, grace_seconds=0)
        ctx.events("Warning", "NodeLost", f"pod {pod.name} of {unit}: {why}; the pod was force-deleted and the unit "
                                          "starts again")
        current.pop(unit, None)
        expected = self.attempts.expected.get(unit)
        if expected is not None and expected[0] <= pod.attempt:
            self.attempts.expected.pop(unit)

    def expect(self, current: dict[str, PodSummary], history: History, running: set[str], now: float) -> None:
        """A pod this process just created may be missing from the pod index for a while (its watch event is
        not in yet, e.g. under load): its unit still runs, or the session would start it again under a new
        attempt and the first pod's result would be rejected. (The ReplicaSet controller's 'expectations'.)"""
        expected = self.attempts.expected
        for unit, (attempt, since) in list(expected.items()):
            pod = current.get(unit)
            if (pod is not None and pod.attempt >= attempt) or recorded(history, unit):
                del expected[unit]
            elif now - since > EXPECTATION_SECONDS:
                logger.warning("%s/%s: the pod of %s (attempt %d) created %.0fs ago is not seen: the unit is not "
                               "running", self.ctx.job.namespace, self.ctx.job.name, unit, attempt, now - since)
                del expected[unit]
            else:
                running.add(unit)

    async def _results(self, pods: dict[str, PodSummary], history: History) -> dict[str, Observed]:
        """The job's results: the operator-wide poller's snapshot, plus a query of this job when a unit's pod has
        succeeded and neither the snapshot nor the pod's termination message has its result. A verified result
        in a succeeded pod's termination message is preferred to the pushed copy: only the kubelet writes a pod's
        status, while anyone reaching the Pushgateway may spoil or delete a group."""
        services, job = self.ctx.services, self.ctx.job
        poller = services.poller
        if poller is not None:  # the poller asks Prometheus only about jobs that wait for a result
            poller.watch(job.uid, any(not recorded(history, unit) and (not pod.done or pod.phase == "Succeeded")
                                      for unit, pod in pods.items()))
        results = dict(poller.results(job.uid)) if poller is not None else {}
        terminated = {} if self.ctx.config.pushed_results_only else self._terminated(pods, history)
        unverified = {}  # judged (and reported) only when Prometheus has nothing better
        for unit, observed in terminated.items():
            if judge(job, observed, pods.get(unit), self.ctx.config.signing_key) == ACCEPT:
                results[unit] = observed
            else:
                unverified[unit] = observed
        needed = any(pod.phase == "Succeeded" and unit not in results and not recorded(history, unit)
                     for unit, pod in pods.items())
        if needed and services.prometheus is not None:
            try:
                results.update(await services.prometheus.job_results(job.uid))
                self.results.error = None
            except MetricsError as exc:
                logger.warning("%s/%s: %s", job.namespace, job.name, exc)
                services.metrics.errors.labels(kind="prometheus").inc()
                self.results.error = str(exc)
        elif needed:
            self.results.error = "no Prometheus URL configured (--prometheus-url / QTUNE_PROMETHEUS_URL)"
        return {**unverified, **results}

    def _terminated(self, pods: dict[str, PodSummary], history: History) -> dict[str, Observed]:
        """unit -> the signed result its succeeded, unrecorded pod left in its termination message."""
        cache, out = self.results.terminated, {}
        for unit, pod in pods.items():
            if pod.phase != "Succeeded" or recorded(history, unit):
                continue
            if pod.uid not in cache:
                cache[pod.uid] = terminated_result(pod)
                if cache[pod.uid] is None and (pod.message or "").startswith(protocol.RESULT_TAG.strip()):
                    logger.warning("%s/%s: pod %s: its termination message holds no valid result",
                                   self.ctx.job.namespace, self.ctx.job.name, pod.name)
            found = cache[pod.uid]
            if found is not None:
                out[unit] = found
        live = {pod.uid for pod in pods.values()}
        for uid in [uid for uid in cache if uid not in live]:
            del cache[uid]
        return out

    # ----------------------------------------------------------------------------------------
    # cancel, start
    async def cancel(self, units: Iterable[str], current: dict[str, PodSummary], doomed: Iterable[str]) -> None:
        """Delete the pods of the cancelled units still running, and the doomed ones (past their time limit)."""
        for unit in units:
            pod = current.get(unit)
            if pod is not None and not pod.done:
                await self.ctx.kube.delete_pod(self.ctx.job.namespace, pod.name)
        for name in doomed:
            await self.ctx.kube.delete_pod(self.ctx.job.namespace, name)

    async def claim(self, body: dict[str, Any]) -> None:
        """Create a ConfigMap of the job unless it exists; an existing one must be the job's own
        (ForeignObject otherwise: a same-named object is never adopted)."""
        ctx = self.ctx
        name = body["metadata"]["name"]
        if await ctx.kube.ensure(body) or name in self.owned:
            self.owned.add(name)
            return
        existing = await ctx.kube.read_configmap(ctx.job.namespace, name)
        if existing is None:  # deleted in between: create it next step
            raise Conflict(f"configmap {name} vanished")
        if ownership(existing, ctx.job) != OWNED:
            raise ForeignObject.of(existing, ctx.job)
        self.owned.add(name)

    async def prepare_starts(self, units: list[WorkUnit], save: bool, cancelling: bool = False) -> list[Start]:
        """Store the history, then write each start's Secret and inputs, all at once, then (the caller) the pods.
        The attempt of each start is recorded in the history (`History.attempts`) and stored BEFORE its Secret is
        created, so a restarted operator never issues the same unit secret twice (a holder of an old one could
        sign for the new pod). A start whose Secret was written ahead (spares.py: its attempt stored in an earlier
        step) has its inputs written while the history is stored; when every start is such a one, its inputs fit
        in its pod and nothing is cancelled, the history is stored with the pods instead (`start`: one round
        trip). A Secret that exists already is never taken for the job's own: its unit takes the next attempt
        (stored again first), at most SECRET_TRIES times. Any failure is raised once every write has ended, and
        then no pod is created and the Secrets and inputs written are deleted."""
        ctx = self.ctx
        assert ctx.spec is not None and ctx.history is not None
        baseline = any(u.id == protocol.UnitKind.BASELINE for u in units)
        if units and (baseline or self.identity is None or self.identity[0] != ctx.generation):
            try:  # every pod runs as the job's own account, or a named one that is opted in
                self.identity = (ctx.generation, await ensure_identity(ctx.kube, ctx.job, ctx.spec, publish=baseline))
            except SpecError as exc:
                raise Terminal(st.INVALID_SPEC, str(exc)) from None
        self.spares.plan = None
        self.save_with_pods = False
        if not units:
            if save:
                await ctx.save()
            return []
        prepared: list[Start] = []
        early: list[tuple[WorkUnit, builders.UnitPlan]] = []
        pending: list[WorkUnit] = []
        name = ""
        for unit in units:
            attempt = self.spares.take(unit.id, self.attempts.latest.get(unit.id))
            if attempt is None:
                pending.append(unit)
            else:
                early.append((unit, plan_of(unit, attempt)))
        self.spares.issue(units, self._issue)
        if save and early and not pending and not cancelling:
            bodies = [self._bodies(unit, plan) for unit, plan in early]
            if all(inputs is None for _, inputs in bodies):
                self.save_with_pods = True
                return [start for start, _ in bodies]
        for _ in range(SECRET_TRIES):
            plans = [plan_of(unit, self._issue(unit.id)) for unit in pending]
            try:  # the attempts first: no Secret exists whose attempt the stored history lacks; the inputs of the
                # starts whose Secret was written ahead (their attempt stored in an earlier step) meanwhile
                await self._gather([ctx.save(), *(self._prepare(u, plan, secret=False) for u, plan in early)], prepared)
                outcomes = await self._gather([self._prepare(u, plan) for u, plan in zip(pending, plans, strict=True)],
                                              prepared)
            except BaseException:
                self.spares.plan = None
                await self._withdraw(prepared)
                raise
            early = []
            taken = [(unit, plan) for unit, plan, item in zip(pending, plans, outcomes, strict=True) if item is None]
            if not taken:
                return prepared
            pending = [unit for unit, _ in taken]
            name = c.unit_key(c.unit_pod(ctx.job.name, taken[0][1].unit, taken[0][1].attempt))
        self.spares.plan = None
        await self._withdraw(prepared)
        raise ForeignObject("Secret", ctx.job.namespace, name, previous=False)

    @staticmethod
    async def _gather(calls: list[Awaitable[Any]], prepared: list[Start]) -> list[Any]:
        """Run `calls` at once; the starts they prepared join `prepared`; the first failure is raised once every
        call has ended."""
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        prepared += [item for item in outcomes if isinstance(item, tuple)]
        failure = next((item for item in outcomes if isinstance(item, BaseException)), None)
        if failure is not None:
            raise failure
        return outcomes

    def _issue(self, unit: str) -> int:
        """The next attempt of `unit`, recorded in the history (stored before its Secret is created)."""
        history = self.ctx.history
        assert history is not None
        attempt = self.attempts.next(unit, history.attempts.get(unit, -1))
        history.attempts[unit] = attempt
        return attempt

    async def _withdraw(self, prepared: list[Start]) -> None:
        """Delete the Secrets and inputs of starts whose pods will not be created (the step failed): no pod ever
        uses them, so nothing else would delete them before the job goes. Best effort: a delete that fails
        leaves its object to the job's deletion (ownerReferences)."""
        job = self.ctx.job
        names = [body["metadata"]["name"] for _, body in prepared]
        deletes = [self.ctx.kube.delete("Secret", job.namespace, c.unit_key(pod)) for pod in names]
        deletes += [self.ctx.kube.delete("ConfigMap", job.namespace, c.unit_inputs(body["metadata"]["name"]))
                    for _, body in prepared if summarize_pod(body).inputs_configmap is not None]
        for outcome in await asyncio.gather(*deletes, return_exceptions=True):
            if isinstance(outcome, Exception):
                logger.warning("%s/%s: a start's Secret or inputs that no pod will use stay until the job is "
                               "deleted: %s", job.namespace, job.name, outcome)
        self.owned.difference_update(c.unit_inputs(pod) for pod in names)

    def _bodies(self, unit: WorkUnit, plan: builders.UnitPlan) -> tuple[Start, dict[str, Any] | None]:
        """The start of `unit` under `plan`'s attempt, and its inputs ConfigMap: None when its inputs travel in
        the pod itself (builders.inline_inputs)."""
        ctx = self.ctx
        assert ctx.spec is not None
        try:
            files = builders.unit_input_files(ctx.job, ctx.spec_dict, plan)
        except protocol.PayloadTooLarge as exc:
            raise Terminal("ConfigTooLarge", str(exc)) from None
        inline = builders.inline_inputs(files)
        annotations = {f"{c.GROUP}/config-key": unit.tune_config.key()} if unit.tune_config is not None else None
        pod = builders.unit_pod(ctx.job, ctx.spec, plan, ctx.config, annotations, inline)
        return (plan, pod), None if inline is not None else builders.unit_inputs(ctx.job, plan, files)

    async def _prepare(self, unit: WorkUnit, plan: builders.UnitPlan, secret: bool = True) -> Start | None:
        """Secret (unless written ahead: `secret` False) and inputs (unless they travel in the pod) of a new start
        of `unit` under `plan`'s attempt, and its pod's body; None when a Secret of that attempt's name exists
        already (the unit takes the next attempt)."""
        ctx = self.ctx
        if plan.kind == protocol.UnitKind.BASELINE:
            await self.claim(builders.configmap(ctx.job, c.baseline_configmap(ctx.job.name), c.ROLE_BASELINE))
        # The operator cannot read Secrets: one it did not just create is never used (it may be anyone's,
        # holding a key its author knows). The unit starts under the next attempt's name instead. The inputs
        # are written alongside (their name is the attempt's); a superseded attempt's are deleted again.
        key = protocol.derive_unit_secret(ctx.config.signing_key, ctx.job.uid, unit.id, plan.attempt)
        secret_body = builders.unit_secret(ctx.job, plan, key)
        start, inputs = self._bodies(unit, plan)
        created, _ = await gather_all([ctx.kube.ensure(secret_body) if secret else asyncio.sleep(0, True),
                                       self.claim(inputs) if inputs is not None else asyncio.sleep(0, True)])
        if not created:
            logger.warning("%s/%s: Secret %s exists already and is not used (it may not be the job's); %s starts "
                           "as attempt %d", ctx.job.namespace, ctx.job.name, secret_body["metadata"]["name"],
                           unit.id, plan.attempt + 1)
            if inputs is not None:
                await ctx.kube.delete("ConfigMap", ctx.job.namespace, inputs["metadata"]["name"])
                self.owned.discard(inputs["metadata"]["name"])
            return None
        return start

    async def start(self, starts: list[Start]) -> None:
        """Create the prepared starts' pods (the history holding their units is stored, or stored now alongside:
        `save_with_pods`), then the spare's Secret."""
        if self.save_with_pods:
            self.save_with_pods = False
            await self._save_with_pods(starts)
        else:
            await gather_all(self._launch(plan, body) for plan, body in starts)
        await self.spares.write()

    async def _save_with_pods(self, starts: list[Start]) -> None:
        """Store the history and create the pods at once. A pod whose history was not stored is deleted again
        (so is its Secret), and the failure raised: the next step reads the stored history and starts its unit
        under a new attempt. Only the window of an operator crash leaves a pod the stored history lacks; a
        restarted operator lets it finish, ignores its result (no record of its trial) and runs the trial again."""
        ctx = self.ctx
        outcomes = await asyncio.gather(ctx.save(), *(self._launch(plan, body) for plan, body in starts),
                                        return_exceptions=True)
        failure = next((item for item in outcomes if isinstance(item, BaseException)), None)
        if failure is None:
            return
        self.spares.plan = None
        created = [body["metadata"]["name"] for (_, body), made in zip(starts, outcomes[1:], strict=True)
                   if made is True]
        if not isinstance(outcomes[0], BaseException):  # the history is stored: only a pod failed
            raise failure
        for name in created:
            await ctx.kube.delete_pod(ctx.job.namespace, name, grace_seconds=0)
        await self._withdraw(starts)
        raise failure

    async def _launch(self, plan: builders.UnitPlan, body: dict[str, Any]) -> bool:
        """Create one pod; True when this call created it."""
        ctx = self.ctx
        if not await ctx.kube.create_pod(body):
            return False
        self.attempts.expected[plan.unit] = (plan.attempt, ctx.services.clock())
        if plan.kind == protocol.UnitKind.TRIAL:
            ctx.metrics.trials_started.inc()
        logger.info("%s/%s: %s started (pod %s)", ctx.job.namespace, ctx.job.name, plan.unit, body["metadata"]["name"])
        return True
