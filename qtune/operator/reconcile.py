"""One QuantizationJob's reconcile step: one turn of the tuning loop (docs/engine.md), no Kopf here.

The session (qtune.tuning.session) decides everything: stop rules, timeouts, the failure policy,
the confirmation, the winner. This module keeps the job's spec, history and error policy and a short step;
the actions are in their own rooms (the causes apart from the actions, as in Kopf):

1. gather: the spec (validated once per generation), the history ConfigMap (once), the session;
2. observe (the pod executor, qtune/operator/pods.py, and the pure `observe` of qtune/operator/observe.py):
   which units run and the outcome of each finished one; pods no node will finish are force-deleted
   (node health: qtune/operator/nodes.py) and their units start again;
3. record the outcomes in unit order and ask `session.advance(running, capacity)` (the session reads the
   operator's clock);
4. apply (the pod executor): save the history before any pod starts, or with it (a trial whose Secret was written
   ahead, qtune/operator/spares.py, and whose inputs travel in its pod: a dispatch costs one API round trip; otherwise
   the Secrets and inputs follow the history, two or three), delete the pods of cancelled units, create the started
   units' pods, then the next trial's Secret; then clean up recorded units (the janitor, qtune/operator/cleanup.py);
5. write the status (the status writer, qtune/operator/statuswriter.py: a projection of the session) and post
   an Event when the state changes.

Every action is idempotent (deterministic names, 409/404 tolerated); a restarted operator
rebuilds everything from the history, the baseline ConfigMap and the pods it finds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes.client import ApiException

from qtune import protocol
from qtune.operator import admission
from qtune.operator import constants as c
from qtune.operator import status as st
from qtune.operator.cleanup import Janitor
from qtune.operator.config import OperatorConfig, module_allowed
from qtune.operator.context import EventSink, JobContext, Services, Terminal
from qtune.operator.imports import import_strategy_module
from qtune.operator.kube import Conflict
from qtune.operator.layout import JobRef, cluster_problem, job_document
from qtune.operator.observe import Observation, queued_status
from qtune.operator.pods import PodExecutor
from qtune.operator.podstatus import PodSummary
from qtune.operator.queueing import KueueReasons, KueueStops
from qtune.operator.statuswriter import StatusWriter
from qtune.operator.store import HISTORY_REJECTED, ForeignObject, PayloadRejected, recorded_sequence
from qtune.spec.errors import SpecError
from qtune.spec.load import job_from_dict
from qtune.spec.models import JobSpec
from qtune.tuning import stop
from qtune.tuning.engine import apply_outcome
from qtune.tuning.history import History
from qtune.tuning.resume import history_resume_message, resume_message
from qtune.tuning.session import Decision, TuningSession
from qtune.tuning.space import TuningSpace

__all__ = ["EventSink", "JobReconciler", "Services", "StepResult", "Terminal", "build_session",
           "check_operator_imports", "status_resume_message", "validate"]

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    state: str
    done: bool = False
    """True when the job reached a terminal state: the loop may end."""
    wait: float = 1.0
    """Seconds until the next step (unless a pod event wakes the loop earlier)."""


def validate(body: Mapping[str, Any]) -> tuple[JobSpec, dict[str, Any]]:
    """The validated spec and the spec dict as stored; raises SpecError naming the field."""
    meta = body["metadata"]
    spec_dict = dict(body.get("spec") or {})
    job = job_from_dict(job_document(JobRef(meta["name"], meta.get("namespace") or "", ""), spec_dict))
    problem = cluster_problem(job.spec)
    if problem is not None:
        raise problem
    return job.spec, spec_dict


def check_operator_imports(spec: JobSpec, allowed_modules: tuple[str, ...]) -> None:
    """Job-supplied code the operator itself would import (a `module:Class` strategy: the session runs
    in the operator) must be in a module the operator's configuration allows; raises SpecError
    WITHOUT importing anything otherwise. Adaptors (`spec.model.framework`) are never imported here:
    the spec model only checks their form."""
    from qtune.tuning.strategies import STRATEGIES
    from qtune.tuning.strategies.base import STRATEGY_FIELD

    name = spec.tuning.strategy
    module, sep, _ = name.partition(":")
    if name in STRATEGIES or not sep:
        return  # a built-in, or an unknown plain name create_strategy reports without importing
    if not module_allowed(module.strip(), allowed_modules):
        now = ", ".join(allowed_modules) if allowed_modules else "none: built-in strategies only"
        builtins = ", ".join(sorted(STRATEGIES))
        raise SpecError(STRATEGY_FIELD, f"cannot import {name}: module {module!r} is not one the operator may "
                                        f"import (allowed: {now}); use a built-in strategy ({builtins}) "
                                        "or ask the operator's administrator to allow the module (operator setting "
                                        "QTUNE_ALLOWED_MODULES / --allowed-modules, comma-separated module prefixes)")


def build_session(spec: JobSpec, history: History, space: TuningSpace | None,
                  allowed_modules: tuple[str, ...], clock: Callable[[], float] = time.time) -> TuningSession:
    """The job's TuningSession, as the operator may build it: only allowed strategy modules are imported,
    and whatever their import or constructor raises (SystemExit and KeyboardInterrupt included) becomes a
    SpecError on spec.tuning.strategy: no job can end the operator process."""
    from qtune.tuning.strategies.base import STRATEGY_FIELD

    check_operator_imports(spec, allowed_modules)
    try:
        return TuningSession(spec, history, space, clock=clock)
    except (SpecError, asyncio.CancelledError):
        raise
    except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise SpecError(STRATEGY_FIELD, f"cannot use {spec.tuning.strategy}: importing or creating it raised "
                                        f"{type(exc).__name__}" + (f": {first}" if first else "")) from None


def status_resume_message(status: Mapping[str, Any], spec: JobSpec) -> str | None:
    """The resume rule (qtune.tuning.resume) from a finished job's status alone, for the budget field handlers:
    why it goes on under the edited `spec`, None when it does not (or is not finished)."""
    if status.get("state") not in st.TERMINAL:
        return None
    trials = status.get("trials") or {}
    return resume_message(status.get("stopReason"), trials=int(trials.get("started", 0)),
                          elapsed_seconds=float(status.get("elapsedSeconds") or 0.0),
                          failed_trials=int(trials.get("failed", 0)), spec=spec)


class JobReconciler:
    """One job's loop: the spec, the history and the error policy; the step asks the rooms to act."""

    def __init__(self, services: Services, job: JobRef, events: EventSink) -> None:
        self.ctx = JobContext(services, job, events)
        self.executor = PodExecutor(self.ctx)
        self.writer = StatusWriter(self.ctx)
        self.janitor = Janitor(self.ctx, self.executor)
        self.kueue_reasons = KueueReasons(self.ctx)
        self.kueue_stops = KueueStops(self.ctx)
        self.space: TuningSpace | None = None
        """The tuning space the baseline published (read once)."""
        self.api_failures = 0
        self.admitted: tuple[int | None] | None = None
        """The generation whose choices were admitted (qtune/operator/admission.py) in this process."""

    @property
    def job(self) -> JobRef:
        return self.ctx.job

    @property
    def config(self) -> OperatorConfig:
        return self.ctx.config

    # ----------------------------------------------------------------------------------------
    # the error policy
    async def step(self, body: Mapping[str, Any], pods: Iterable[PodSummary]) -> StepResult:
        started = time.perf_counter()
        now = self.ctx.services.clock()
        try:
            result = await self._step(body, list(pods), now)
            self.api_failures = 0
            return result
        except (Terminal, PayloadRejected) as exc:
            await self.janitor.revoke()
            await self.writer.publish(st.FAILED_STATE, exc.reason, exc.message, now)
            return StepResult(st.FAILED_STATE, done=True)
        except ForeignObject as exc:
            return await self._foreign(exc, now)
        except Conflict as exc:
            logger.warning("%s/%s: %s; reloading the history", self.job.namespace, self.job.name, exc)
            self.ctx.metrics.errors.labels(kind="conflict").inc()
            self.ctx.history = None
            return StepResult(self.writer.last_state or st.PENDING, wait=self.config.poll_interval)
        except ApiException as exc:
            self.ctx.history = None  # start over from the stored history
            if exc.status is None or not 400 <= exc.status < 500 or exc.status in (404, 409):
                raise
            return await self._refused(exc, now)
        except Exception:
            # the in-memory history may hold changes that never reached the ConfigMap: start over
            # from the stored one (a pod created with a history that was not stored is deleted: pods.py)
            self.ctx.history = None
            raise
        finally:
            self.ctx.metrics.step_seconds.observe(time.perf_counter() - started)

    async def _foreign(self, exc: ForeignObject, now: float) -> StepResult:
        """An object of a name this job needs is not the job's: an earlier job's is waited for (the
        garbage collector deletes it); anyone else's fails the job, naming it. Never adopted."""
        logger.warning("%s/%s: %s", self.job.namespace, self.job.name, exc.message)
        state = self.writer.last_state or st.PENDING
        if exc.previous:  # an earlier job's object, or a shared account another job's baseline holds (rbac.py)
            await self.writer.publish(state, getattr(exc, "reason", st.WAITING_FOR_CLEANUP), exc.message, now)
            return StepResult(state, wait=max(self.config.poll_interval, 2.0))
        await self.writer.publish(st.FAILED_STATE, st.OBJECT_CONFLICT, exc.message, now)
        return StepResult(st.FAILED_STATE, done=True)

    async def _refused(self, exc: ApiException, now: float) -> StepResult:
        """An API 4xx answer (quota, forbidden, invalid object): a condition with the API's message,
        retried a bounded number of times, then the job fails."""
        self.api_failures += 1
        message = f"the API server refused a request (HTTP {exc.status}): {api_message(exc)}"
        self.ctx.metrics.errors.labels(kind=f"http{exc.status}").inc()
        limit = self.config.api_retries
        logger.warning("%s/%s: %s (%d/%d)", self.job.namespace, self.job.name, message, self.api_failures, limit)
        try:
            if self.api_failures >= limit:
                await self.writer.publish(st.FAILED_STATE, st.API_ERROR, f"{message}; gave up after {limit} attempts",
                                          now)
                return StepResult(st.FAILED_STATE, done=True)
            await self.writer.publish(self.writer.last_state or st.PENDING, st.API_ERROR,
                                      f"{message}; retrying ({self.api_failures}/{limit})", now)
        except ApiException as again:
            logger.warning("%s/%s: cannot write the status either: %s", self.job.namespace, self.job.name,
                           api_message(again))
        return StepResult(self.writer.last_state or st.PENDING, wait=min(60.0, 2.0 * 2 ** self.api_failures))

    # ----------------------------------------------------------------------------------------
    # the step: gather, observe, record, advance, apply, publish
    async def _step(self, body: Mapping[str, Any], pods: list[PodSummary], now: float) -> StepResult:
        self.writer.remember(body)
        spec = self._spec(body)
        history = await self._history(now, recorded_sequence(body.get("status")))
        await self._admit(spec, history)
        session = await self._session(spec, history)
        current = self.executor.current(pods)
        await self._maybe_continue(history, spec, current, now)
        seen = await self.executor.observe(pods, current, history, now)
        self.writer.report_rejections(seen.rejected)
        records = self._record(session, history, seen)
        decision = self._advance(session, seen)
        changed = bool(seen.outcomes or decision.changed)
        # the history first, then pods: the starts' Secrets after it (or, written ahead, earlier), their inputs
        # meanwhile (they start nothing); their pods only once it is stored, or with it when every Secret was
        # written ahead and every start's inputs travel in its pod
        starts = await self.executor.prepare_starts(decision.start, save=changed,
                                                    cancelling=bool(decision.cancel or seen.doomed))
        if changed:
            self.writer.count(records)
        await self.executor.cancel(decision.cancel, current, seen.doomed)
        await self.executor.start(starts)
        await self.janitor.clean(history, current, session if decision.finished else None)
        if decision.finished:
            return await self._finished(session, now)
        return await self._running(session, seen, decision, now)

    def _spec(self, body: Mapping[str, Any]) -> JobSpec:
        """The validated spec, validated again only when the generation changed."""
        ctx = self.ctx
        generation = body["metadata"].get("generation")
        if generation != ctx.generation or ctx.spec is None:
            try:
                ctx.spec, ctx.spec_dict = validate(body)
                check_operator_imports(ctx.spec, self.config.allowed_modules)
                admission.check_choices(ctx.spec, self.config)
            except SpecError as exc:
                ctx.spec = None
                raise Terminal(st.INVALID_SPEC, str(exc)) from None
            ctx.generation = generation
        assert ctx.spec is not None
        return ctx.spec

    async def _history(self, now: float, recorded: int) -> History:
        """The stored history (a new one stored at once), and the space the baseline published. `recorded`: the
        history sequence the job's status records; a history held in memory older than that was stored since by a
        peer (read again), a stored one older than that is refused (HistoryRejected)."""
        ctx = self.ctx
        if ctx.history is not None and ctx.history.sequence < recorded:
            ctx.history = None
        if ctx.history is None:
            loaded = await ctx.store.load(recorded)
            if loaded is None and (self.writer.last_status or {}).get("history"):
                raise PayloadRejected(HISTORY_REJECTED, (
                    f"ConfigMap {self.job.namespace}/{ctx.store.name} is gone although the job's status says its "
                    "history was stored: it was deleted by someone other than the operator; the job does not start "
                    "over. Delete and recreate the job to tune again"))
            ctx.history = loaded or History(job=self.job.name, started_at=now)
            if loaded is None:
                await ctx.save()
        history = ctx.history
        if history.baseline is not None and self.space is None:
            # the history is signed: its baseline's space hash is the one the baseline's signed result named
            published = await ctx.read_owned(c.baseline_configmap(self.job.name))
            self.space = self.executor.spaces.load(published, history.baseline.space_sha256)
        return history

    async def _admit(self, spec: JobSpec, history: History) -> None:
        """Once per generation, before any pod: the workspace PVC is opted in, and the image, claim and account
        are those the job's pods were first created with (pinned in the history, stored at once)."""
        if self.admitted == (self.ctx.generation,):
            return
        try:
            await admission.check_claim(self.ctx.kube, self.job, spec, self.config)
            if admission.pin(history, spec):
                await self.ctx.save()
        except SpecError as exc:
            raise Terminal(st.INVALID_SPEC, str(exc)) from None
        self.admitted = (self.ctx.generation,)

    async def _session(self, spec: JobSpec, history: History) -> TuningSession:
        try:
            await import_strategy_module(spec.tuning.strategy, "spec.tuning.strategy", self.config.import_timeout,
                                         self.config.allowed_modules)
            return build_session(spec, history, self.space, self.config.allowed_modules, self.ctx.services.clock)
        except SpecError as exc:
            raise Terminal(st.INVALID_SPEC, str(exc)) from None

    async def _maybe_continue(self, history: History, spec: JobSpec, pods: dict[str, PodSummary],
                              now: float) -> None:
        """Once the spec was edited since the job stopped: a job stopped by a budget goes on when the resume
        rule says so (qtune.tuning.resume), a failed baseline runs again."""
        generation = self.ctx.generation
        if history.stop_reason is None or generation is None or \
                (self.writer.last_status or {}).get("observedGeneration") in (None, generation):
            return
        if history.stop_reason == stop.BASELINE_FAILED:
            message = f"spec changed (generation {generation}): the baseline runs again"
            failed = pods.pop(protocol.UnitKind.BASELINE, None)
            if failed is not None:  # its failure is history: the next start is a new attempt
                await self.executor.retire(protocol.UnitKind.BASELINE.value, failed)
            history.message = None
        else:
            resumed = history_resume_message(history, spec, now)
            if resumed is None:
                return
            message = f"spec changed (generation {generation}), {resumed}"
        logger.info("%s/%s: %s", self.job.namespace, self.job.name, message)
        history.stop_reason = None
        history.outcome = None
        history.start_clock(now)
        await self.ctx.save()
        self.ctx.events("Normal", st.RESUMED, message)

    def _record(self, session: TuningSession, history: History, seen: Observation) -> list[Any]:
        """The outcomes, in unit order, recorded in the session; the trial records they finished."""
        records = []
        for outcome in seen.outcomes:
            record = apply_outcome(session, outcome)
            if outcome.unit_id == protocol.UnitKind.BASELINE and session.space is not None:
                self.space = session.space
                self.ctx.events("Normal", "BaselineReady", f"fp32 accuracy {history.baseline.accuracy:.4f}, "  # type: ignore[union-attr]
                                f"{len(session.space.ops)} quantizable ops")
            if record is not None:
                records.append(record)
        return records

    def _advance(self, session: TuningSession, seen: Observation) -> Decision:
        """The session's decision (on the operator's clock; a finished job's clock stops in the session)."""
        assert self.ctx.spec is not None
        return session.advance(frozenset(seen.running), self.ctx.spec.tuning.parallel_trials)

    async def _running(self, session: TuningSession, seen: Observation, decision: Decision,
                       now: float) -> StepResult:
        """The status of a job that goes on, and when to step again."""
        confirming = (protocol.UnitKind.CONFIRM in seen.running
                      or any(u.id == protocol.UnitKind.CONFIRM for u in decision.start))
        state, reason, message = self.writer.running(session, confirming)
        reason, message = self.executor.nodes.waiting(
            seen, reason, message, now,
            lambda: self.writer.progress(session) if session.ready else "the fp32 baseline waits")
        kueue_reasons = await self.kueue_reasons.refresh(bool(seen.queued), now)
        reason, message = queued_status(seen, reason, message, now, kueue_reasons)
        self.kueue_stops.note(seen.kueue_stopped.values())
        await self.kueue_stops.store()
        message = self.kueue_stops.status(message)
        metrics_error = self.executor.results.error
        if seen.awaiting:
            reason, message = st.WAITING_FOR_RESULTS, self.writer.waiting_message(seen.awaiting, now, metrics_error)
        await self.writer.publish(state, reason, message, now, session=session)
        wait = self.config.poll_interval
        if seen.awaiting_results:  # quick while results trickle in, slower while Prometheus is failing
            wait = self.config.metrics_poll_interval if metrics_error is None else max(wait, 2.0)
        if decision.wait is not None:  # the session's backoff after failures: come back when it ends
            wait = min(wait, max(decision.wait, 0.05))
        return StepResult(state, wait=wait)

    async def _finished(self, session: TuningSession, now: float) -> StepResult:
        """Terminal: the session's outcome and verdict; every Pushgateway group of the job goes."""
        history = session.history
        outcome = history.outcome or session.outcome()
        reason = outcome
        message = session.verdict()
        if outcome == stop.BASELINE_FAILED:
            failure, text = protocol.parse_termination(history.message)
            if failure == protocol.INVALID_SPEC:
                reason, message = st.INVALID_SPEC, text
        await self.janitor.forget_job()
        state = st.state_for_outcome(outcome)
        await self.writer.publish(state, reason, message, now, session=session, stop_reason=history.stop_reason)
        return StepResult(state, done=True)


def api_message(exc: ApiException) -> str:
    """The API server's own message (Status.message), else the HTTP reason."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    return str(body.get("message") or exc.reason or exc)[:500]
