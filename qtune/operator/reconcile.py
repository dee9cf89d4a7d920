"""One QuantizationJob's reconcile step: one turn of the tuning loop (docs/engine.md), no Kopf here.

The session (qtune.tuning.session) decides everything: stop rules, timeouts, the failure policy,
the confirmation, the winner. A step only

1. gathers (I/O): the spec, the history ConfigMap (once), the job's pods (from the pod index),
   the job's results in Prometheus, the baseline's published tuning space;
2. observes (pure, `observe`): which units run, and the outcome of each finished one — a result
   believed only with proof of origin (qtune/operator/results.py), else a failure read from
   the pod (OOMKilled, Crashed, Timeout, MetricsUnavailable ...); a succeeded unit waits for its result
   up to the results deadline (WaitingForResults), pods on lost nodes or stuck terminating are
   force-deleted (`_reap`: the session starts the unit again), pods past their time limit fail;
3. records the outcomes in unit order and asks `session.advance(elapsed, running, capacity)`;
4. applies (I/O): saves the history BEFORE any pod starts (the started units' Secrets and inputs
   ConfigMaps are written meanwhile: a dispatch costs two API round trips, not four), deletes the
   pods of cancelled units, creates the started units' pods, cleans up recorded units;
5. writes the status (a projection of the session) and posts an Event when the state changes.

Every action is idempotent (deterministic names, 409/404 tolerated); a restarted operator
rebuilds everything from the history, the baseline ConfigMap and the pods it finds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from kubernetes.client import ApiException

from qtune import protocol
from qtune.operator import builders, cleanup
from qtune.operator import constants as c
from qtune.operator import status as st
from qtune.operator.config import RESULTS_DEADLINE_DEFAULT, OperatorConfig, module_allowed
from qtune.operator.imports import import_strategy_module
from qtune.operator.kube import Conflict, Kube
from qtune.operator.layout import JobRef, cluster_problem, job_document, trial_dir, workspace_dir
from qtune.operator.metrics import OperatorMetrics
from qtune.operator.podstatus import PodSummary, bounded_reason, failure_of
from qtune.operator.prom import MetricsError, PrometheusClient, PushgatewayClient, ResultsPoller
from qtune.operator.rbac import ensure_identity
from qtune.operator.results import ACCEPT, STALE, WAIT, Observed, judge, unit_pods
from qtune.operator.store import (
    OWNED,
    ForeignObject,
    HistoryStore,
    HistoryTooLarge,
    PayloadRejected,
    decode_published,
    ownership,
)
from qtune.spec.errors import SpecError
from qtune.spec.load import job_from_dict
from qtune.spec.models import JobSpec
from qtune.tuning import stop
from qtune.tuning.engine import UnitFailure, UnitOutcome, apply_outcome
from qtune.tuning.front import session_front
from qtune.tuning.history import History
from qtune.tuning.session import TuningSession, WorkUnit, objective_batch_size
from qtune.tuning.space import TuningSpace

logger = logging.getLogger(__name__)
T = TypeVar("T")

METRICS_UNAVAILABLE = "MetricsUnavailable"
SECRET_TRIES = 3
"""Attempts whose unit Secret already existed before a unit start gives up (ObjectConflict)."""
NODE_CACHE_SECONDS = 10.0
EXPECTATION_SECONDS = 60.0
"""How long a pod this process created counts as running while the pod index does not show it yet."""


class EventSink(Protocol):
    def __call__(self, kind: str, reason: str, message: str) -> None: ...


@dataclass
class Services:
    """What every job's loop shares: API clients, settings, the operator's metrics."""

    kube: Kube
    config: OperatorConfig
    metrics: OperatorMetrics
    prometheus: PrometheusClient | None = None
    pushgateway: PushgatewayClient | None = None
    poller: ResultsPoller | None = None
    clock: Callable[[], float] = time.time
    nodes_unreadable: bool = False
    """The operator may not read nodes (403): pods on lost nodes are left to the cluster."""
    nodes: dict[str, tuple[float, dict[str, Any] | None]] = field(default_factory=dict)
    """Node name -> (read at, Node or None when gone): one read serves every job for a few seconds."""
    node_reads: dict[str, asyncio.Future[dict[str, Any] | None]] = field(default_factory=dict)
    """Node reads in flight: every job waiting on a node shares one request."""


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
                  allowed_modules: tuple[str, ...]) -> TuningSession:
    """The job's TuningSession, as the operator may build it: only allowed strategy modules are imported,
    and whatever their import or constructor raises (SystemExit and KeyboardInterrupt included) becomes a
    SpecError on spec.tuning.strategy: no job can end the operator process."""
    from qtune.tuning.strategies.base import STRATEGY_FIELD

    check_operator_imports(spec, allowed_modules)
    try:
        return TuningSession(spec, history, space)
    except (SpecError, asyncio.CancelledError):
        raise
    except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise SpecError(STRATEGY_FIELD, f"cannot use {spec.tuning.strategy}: importing or creating it raised "
                                        f"{type(exc).__name__}" + (f": {first}" if first else "")) from None


def can_resume(history: History, spec: JobSpec) -> bool:
    """A job stopped by its trial budget continues when spec.tuning.maxTrials was raised."""
    return history.stop_reason == stop.MAX_TRIALS and spec.tuning.max_trials > len(history.trials)


def resumable_status(status: Mapping[str, Any], max_trials: int) -> bool:
    """The same decision from the status alone (for the maxTrials field handler)."""
    trials = status.get("trials") or {}
    return (status.get("state") in st.TERMINAL and status.get("stopReason") == stop.MAX_TRIALS
            and max_trials > int(trials.get("started", 0)))


def unit_order(unit: str) -> tuple[int, int]:
    """baseline, trial-0, trial-1, ..., confirm: the order outcomes are recorded in."""
    index = protocol.unit_trial_index(unit)
    if unit == protocol.BASELINE_UNIT:
        return (0, 0)
    return (1, index) if index is not None else (2, 0)


def recorded(history: History, unit: str) -> bool:
    """The session has this unit's outcome (its pod is no longer 'running')."""
    if unit == protocol.BASELINE_UNIT:
        return history.baseline is not None or history.stop_reason == stop.BASELINE_FAILED
    if unit == protocol.CONFIRM_UNIT:
        done = history.confirmation
        return done is not None and int(done.get("trials_seen", -1)) == len(history.trials)
    index = protocol.unit_trial_index(unit)
    record = next((t for t in history.trials if t.index == index), None)
    return record is None or record.done


# ------------------------------------------------------------------------------------------------
# observe: pods + results -> running units and outcomes (pure)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """How long the operator waits for what (observe's clock rules)."""

    results_deadline: float = RESULTS_DEADLINE_DEFAULT
    """A succeeded unit's result may take this long to become queryable."""
    trial_timeout: float = 0.0
    """spec.tuning.trialTimeoutSeconds (0: none): a unit's pod, pending or running, older than its unit's
    time limit plus `grace` fails the unit (a pod the scheduler never places does not wait forever)."""
    grace: float = 60.0


@dataclass
class Observation:
    running: set[str] = field(default_factory=set)
    outcomes: list[UnitOutcome] = field(default_factory=list)
    rejected: list[tuple[Observed, str]] = field(default_factory=list)
    awaiting: dict[str, float] = field(default_factory=dict)
    """unit -> since when its succeeded pod waits for its result."""
    waiting_for_node: str | None = None
    unschedulable_since: float | None = None
    unschedulable_pod: str | None = None
    doomed: list[str] = field(default_factory=list)
    """Pods still there whose unit was recorded failed here (past their time limit): delete them."""

    @property
    def awaiting_results(self) -> bool:
        return bool(self.awaiting)


def observe(job: JobRef, history: History, pods: dict[str, PodSummary], results: Mapping[str, Observed],
            space_doc: Any | None, signing_key: str, awaiting: dict[str, float], now: float,
            limits: Limits | None = None) -> Observation:
    """What the cluster says about each unit. `awaiting` (unit -> since when a succeeded pod waits for
    its result) is updated in place. A succeeded unit is never given up before `limits.results_deadline`
    has passed on this clock (a restarted operator starts the clock again: it waits longer, never less)."""
    limits = limits or Limits()
    seen = Observation()
    verdicts = {unit: judge(job, obs, pods.get(unit), signing_key) for unit, obs in results.items()}
    for unit, verdict in verdicts.items():
        if verdict not in (ACCEPT, WAIT, STALE) and not recorded(history, unit):
            seen.rejected.append((results[unit], verdict))
    for unit, pod in sorted(pods.items(), key=lambda item: unit_order(item[0])):
        if recorded(history, unit):
            awaiting.pop(unit, None)
            continue
        if pod.phase == "Succeeded":
            outcome = None
            if verdicts.get(unit) == ACCEPT:
                if unit != protocol.BASELINE_UNIT:
                    outcome = UnitOutcome(unit, results[unit].result)
                elif space_doc is not None:
                    outcome = UnitOutcome(unit, results[unit].result, TuningSpace.from_dict(space_doc))
            if outcome is not None:
                awaiting.pop(unit, None)
                seen.outcomes.append(outcome)
                continue
            since = awaiting.setdefault(unit, now)
            if now - since > limits.results_deadline:
                awaiting.pop(unit, None)
                what = "its signed result and the published tuning space were" if unit == protocol.BASELINE_UNIT \
                    else "its signed result was"
                seen.outcomes.append(UnitOutcome(unit, UnitFailure(
                    METRICS_UNAVAILABLE, f"the pod {pod.name} succeeded but {what} not available (Prometheus, "
                                         f"ConfigMap) within {limits.results_deadline:g}s")))
            else:
                seen.running.add(unit)
                seen.awaiting[unit] = since
        elif pod.deleting:
            continue  # going away without a result: the session starts the unit again if it still wants it
        elif pod.phase == "Failed":
            reason, message = failure_of(pod)
            if unit == protocol.BASELINE_UNIT:
                message = protocol.termination_message(reason, message)
            seen.outcomes.append(UnitOutcome(unit, UnitFailure(reason, message)))
        elif (overdue := _overdue(unit, pod, now, limits)) is not None:
            reason, message = overdue
            if unit == protocol.BASELINE_UNIT:
                message = protocol.termination_message(reason, message)
            seen.outcomes.append(UnitOutcome(unit, UnitFailure(reason, message)))
            seen.doomed.append(pod.name)
        else:
            seen.running.add(unit)
            if pod.unschedulable and seen.waiting_for_node is None:
                seen.waiting_for_node = pod.unschedulable
                seen.unschedulable_since = pod.unschedulable_since
                seen.unschedulable_pod = pod.name
    return seen


def _overdue(unit: str, pod: PodSummary, now: float, limits: Limits) -> tuple[str, str] | None:
    """(reason, message) when a pod that has not finished is past its unit's time limit plus the grace: counted
    from its start, or from its creation while it never started (pending, unschedulable)."""
    if not limits.trial_timeout:
        return None
    kind = protocol.BASELINE_UNIT if unit == protocol.BASELINE_UNIT else \
        protocol.CONFIRM_UNIT if unit == protocol.CONFIRM_UNIT else "trial"
    limit = protocol.unit_timeout_seconds(kind, limits.trial_timeout)
    since = pod.started if pod.started is not None else pod.created
    if since is None or now - since <= limit + limits.grace:
        return None
    if pod.started is None:
        where = f"the scheduler could not place it: {pod.unschedulable}" if pod.unschedulable else "it never started"
        return ("Unschedulable" if pod.unschedulable else "Timeout",
                f"the pod {pod.name} was still pending {now - since:.0f}s after its creation ({where}); the unit's "
                f"time limit is {limit:g}s (spec.tuning.trialTimeoutSeconds)")
    return "Timeout", (f"the pod {pod.name} was still running {now - since:.0f}s after it started; the unit's time "
                       f"limit is {limit:g}s (spec.tuning.trialTimeoutSeconds)")


async def gather_all(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """asyncio.gather that lets every awaitable end before raising the first failure (none is left running
    unawaited, e.g. a write the next step would not know about)."""
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for item in results:
        if isinstance(item, BaseException):
            raise item
    return list(results)  # type: ignore[arg-type]


def plan_of(unit: WorkUnit, attempt: int) -> builders.UnitPlan:
    return builders.UnitPlan(unit=unit.id, attempt=attempt, trial=unit.trial, tune_config=unit.tune_config,
                             candidates=tuple(unit.candidates), candidate_configs=dict(unit.candidate_configs),
                             full_evaluation=unit.full_evaluation)


# ------------------------------------------------------------------------------------------------
# the reconciler: gather, observe, record, advance, apply, publish
# ------------------------------------------------------------------------------------------------


class Terminal(Exception):
    """The job cannot go on (invalid spec, history too large, API refusals): Failed with this reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class JobReconciler:
    services: Services
    job: JobRef
    events: EventSink

    spec: JobSpec | None = None
    spec_dict: dict[str, Any] = field(default_factory=dict)
    generation: int | None = None
    history: History | None = None
    space: TuningSpace | None = None
    last_status: dict[str, Any] | None = None
    last_state: str | None = None
    published: tuple[Any, ...] | None = None
    """What the last status written was built from (see `publish`)."""
    progress: tuple[Any, str] | None = None
    """(history version, the status message `_progress` made for it)."""
    awaiting: dict[str, float] = field(default_factory=dict)
    """unit -> when its finished pod started waiting for its result (this process's clock)."""
    attempts: dict[str, int] = field(default_factory=dict)
    """unit -> the highest attempt started or seen (a new start takes the next one)."""
    cleaned: set[str] = field(default_factory=set)
    """Pods of recorded units already cleaned up (once per process)."""
    rejected: set[tuple[str, str]] = field(default_factory=set)
    """(unit, signature) of results already rejected (counted and reported once)."""
    retired: set[str] = field(default_factory=set)
    """uids of failed pods whose failure was put aside (a failed baseline run again after an edit)."""
    api_failures: int = 0
    models_cleaned: int = -1
    """Trials the models cleanup was started for (once per finish in this process)."""
    owned: set[str] = field(default_factory=set)
    """ConfigMaps this process created or found owned by the job's uid (deletable without a read)."""
    expected: dict[str, tuple[int, float]] = field(default_factory=dict)
    """unit -> (attempt, when) of pods this process created that the pod index has not shown yet."""
    identity: tuple[int | None, str] | None = None
    """(generation, ServiceAccount) whose use by the job's pods was checked (rbac.ensure_identity)."""
    metrics_error: str | None = None
    """The last error of a results query (the job's own or the operator-wide poller's); None once one worked."""
    unschedulable_reported: set[str] = field(default_factory=set)
    """Pods whose Unschedulable Event was posted (once each)."""
    node_lost: dict[str, float] = field(default_factory=dict)
    """node name -> since when this process sees it gone (its own clock; NotReady has the node's own time)."""

    def __post_init__(self) -> None:
        self.store = HistoryStore(self.services.kube, self.job, self.services.config.history_plain_limit)

    @property
    def config(self) -> OperatorConfig:
        return self.services.config

    @property
    def kube(self) -> Kube:
        return self.services.kube

    # ----------------------------------------------------------------------------------------
    async def step(self, body: Mapping[str, Any], pods: Iterable[PodSummary]) -> StepResult:
        started = time.perf_counter()
        now = self.services.clock()
        try:
            result = await self._step(body, list(pods), now)
            self.api_failures = 0
            return result
        except (Terminal, PayloadRejected) as exc:
            await self.publish(st.FAILED_STATE, exc.reason, exc.message, now)
            return StepResult(st.FAILED_STATE, done=True)
        except ForeignObject as exc:
            return await self._foreign(exc, now)
        except Conflict as exc:
            logger.warning("%s/%s: %s; reloading the history", self.job.namespace, self.job.name, exc)
            self.services.metrics.errors.labels(kind="conflict").inc()
            self.history = None
            return StepResult(self.last_state or st.PENDING, wait=self.config.poll_interval)
        except ApiException as exc:
            self.history = None  # start over from the stored history
            if exc.status is None or not 400 <= exc.status < 500 or exc.status in (404, 409):
                raise
            return await self._refused(exc, now)
        except Exception:
            # the in-memory history may hold changes that never reached the ConfigMap: start over
            # from the stored one, so no pod is ever created for a trial the store does not know
            self.history = None
            raise
        finally:
            self.services.metrics.step_seconds.observe(time.perf_counter() - started)

    async def _foreign(self, exc: ForeignObject, now: float) -> StepResult:
        """An object of a name this job needs is not the job's: an earlier job's is waited for (the
        garbage collector deletes it); anyone else's fails the job, naming it. Never adopted."""
        logger.warning("%s/%s: %s", self.job.namespace, self.job.name, exc.message)
        if exc.previous:
            await self.publish(self.last_state or st.PENDING, st.WAITING_FOR_CLEANUP, exc.message, now)
            return StepResult(self.last_state or st.PENDING, wait=max(self.config.poll_interval, 2.0))
        await self.publish(st.FAILED_STATE, st.OBJECT_CONFLICT, exc.message, now)
        return StepResult(st.FAILED_STATE, done=True)

    async def _read_owned(self, name: str) -> dict[str, Any] | None:
        """A ConfigMap of the job, None when absent or not this job's (never believed then)."""
        body = await self.kube.read_configmap(self.job.namespace, name)
        if body is not None and ownership(body, self.job) != OWNED:
            logger.warning("%s/%s: %s", self.job.namespace, self.job.name, ForeignObject.of(body, self.job).message)
            return None
        return body

    async def _claim(self, body: dict[str, Any]) -> None:
        """Create a ConfigMap of the job unless it exists; an existing one must be the job's own
        (ForeignObject otherwise: a same-named object is never adopted)."""
        name = body["metadata"]["name"]
        if await self.kube.ensure(body) or name in self.owned:
            self.owned.add(name)
            return
        existing = await self.kube.read_configmap(self.job.namespace, name)
        if existing is None:  # deleted in between: create it next step
            raise Conflict(f"configmap {name} vanished")
        if ownership(existing, self.job) != OWNED:
            raise ForeignObject.of(existing, self.job)
        self.owned.add(name)

    async def _refused(self, exc: ApiException, now: float) -> StepResult:
        """An API 4xx answer (quota, forbidden, invalid object): a condition with the API's message,
        retried a bounded number of times, then the job fails."""
        self.api_failures += 1
        message = f"the API server refused a request (HTTP {exc.status}): {api_message(exc)}"
        self.services.metrics.errors.labels(kind=f"http{exc.status}").inc()
        limit = self.config.api_retries
        logger.warning("%s/%s: %s (%d/%d)", self.job.namespace, self.job.name, message, self.api_failures, limit)
        try:
            if self.api_failures >= limit:
                await self.publish(st.FAILED_STATE, st.API_ERROR, f"{message}; gave up after {limit} attempts", now)
                return StepResult(st.FAILED_STATE, done=True)
            await self.publish(self.last_state or st.PENDING, st.API_ERROR,
                               f"{message}; retrying ({self.api_failures}/{limit})", now)
        except ApiException as again:
            logger.warning("%s/%s: cannot write the status either: %s", self.job.namespace, self.job.name,
                           api_message(again))
        return StepResult(self.last_state or st.PENDING, wait=min(60.0, 2.0 * 2 ** self.api_failures))

    async def _step(self, body: Mapping[str, Any], pods: list[PodSummary], now: float) -> StepResult:
        meta = body["metadata"]
        generation = meta.get("generation")
        if self.last_status is None:
            self.last_status = dict(body.get("status") or {})
            self.last_state = self.last_status.get("state")

        # 1. the spec, the history, the session
        if generation != self.generation or self.spec is None:
            try:
                self.spec, self.spec_dict = validate(body)
                check_operator_imports(self.spec, self.config.allowed_modules)
            except SpecError as exc:
                self.spec = None
                raise Terminal(st.INVALID_SPEC, str(exc)) from None
            self.generation = generation
        spec = self.spec
        assert spec is not None
        if self.history is None:
            loaded = await self.store.load()
            self.history = loaded or History(job=self.job.name, started_at=now)
            if loaded is None:
                await self._save()
        history = self.history
        if history.baseline is not None and self.space is None:
            published = await self._read_owned(c.baseline_configmap(self.job.name))
            document = decode_published(published, c.SPACE_KEY)
            self.space = TuningSpace.from_dict(document) if document is not None else None
        try:
            await import_strategy_module(spec.tuning.strategy, "spec.tuning.strategy", self.config.import_timeout,
                                         self.config.allowed_modules)
            session = build_session(spec, history, self.space, self.config.allowed_modules)
        except SpecError as exc:
            raise Terminal(st.INVALID_SPEC, str(exc)) from None
        current = unit_pods(self.job, [p for p in pods if p.uid not in self.retired])
        await self._maybe_continue(history, spec, generation, current, now)

        # 2. observe
        for unit, pod in current.items():
            self.attempts[unit] = max(self.attempts.get(unit, -1), pod.attempt)
        await self._reap([p for p in pods if p.owned_by(self.job.namespace, self.job.uid)], current, now)
        results = await self._results(current, history)
        space_doc = None
        baseline_pod = current.get(protocol.BASELINE_UNIT)
        if baseline_pod is not None and baseline_pod.phase == "Succeeded" and not recorded(history, "baseline"):
            published = await self._read_owned(c.baseline_configmap(self.job.name))
            space_doc = decode_published(published, c.SPACE_KEY)
        limits = Limits(self.config.results_deadline_seconds, float(spec.tuning.trial_timeout_seconds),
                        self.config.trial_grace_seconds)
        seen = observe(self.job, history, current, results, space_doc, self.config.signing_key, self.awaiting, now,
                       limits)
        self._report_rejections(seen.rejected)
        self._expect(current, history, seen.running, now)

        # 3. record, then let the session decide
        finished_records = []
        for outcome in seen.outcomes:
            record = apply_outcome(session, outcome)
            if outcome.unit_id == protocol.BASELINE_UNIT and session.space is not None:
                self.space = session.space
                self.events("Normal", "BaselineReady", f"fp32 accuracy {history.baseline.accuracy:.4f}, "  # type: ignore[union-attr]
                            f"{len(session.space.ops)} quantizable ops")
            if record is not None:
                finished_records.append(record)
        elapsed = history.elapsed_seconds + (now - history.started_at if history.started_at else 0.0)
        decision = session.advance(elapsed, frozenset(seen.running), spec.tuning.parallel_trials)
        if decision.finished and history.started_at is not None:
            history.elapsed_seconds += now - history.started_at
            history.started_at = None

        # 4. apply: the history first, then pods. The starts' Secrets and inputs are written while the history
        # is (they start nothing); their pods only once it is stored.
        starts = await self._prepare_starts(decision.start, save=bool(seen.outcomes or decision.changed))
        if seen.outcomes or decision.changed:
            self._count(finished_records)
        for unit in decision.cancel:
            pod = current.get(unit)
            if pod is not None and not pod.done:
                await self.kube.delete_pod(self.job.namespace, pod.name)
        for name in seen.doomed:
            await self.kube.delete_pod(self.job.namespace, name)
        await gather_all(self._launch(plan, body) for plan, body in starts)
        await self._cleanup(history, current, session if decision.finished else None)

        # 5. status
        if decision.finished:
            return await self._finished(session, now)
        state = st.RUNNING if session.ready else st.BASELINE
        if not session.ready:
            reason, message = st.REASON_BASELINE, "measuring the fp32 baseline and the tuning space"
        elif protocol.CONFIRM_UNIT in seen.running or any(u.id == protocol.CONFIRM_UNIT for u in decision.start):
            reason, message = st.REASON_CONFIRMING, "re-measuring the best candidates against fp32"
        else:
            reason, message = st.REASON_TUNING, self._progress(session)
        if seen.waiting_for_node:
            message += f"; waiting for a node: {seen.waiting_for_node}"
            since = seen.unschedulable_since
            if since is not None and now - since >= self.config.unschedulable_seconds:
                reason = st.UNSCHEDULABLE
                then = self._progress(session) if session.ready else "the fp32 baseline waits"
                message = (f"pod {seen.unschedulable_pod} cannot be scheduled for {now - since:.0f}s: "
                           f"{seen.waiting_for_node}; {then}")
                if seen.unschedulable_pod not in self.unschedulable_reported:
                    self.unschedulable_reported.add(seen.unschedulable_pod or "")
                    self.events("Warning", st.UNSCHEDULABLE, f"pod {seen.unschedulable_pod}: {seen.waiting_for_node}")
        if seen.awaiting:
            reason, message = st.WAITING_FOR_RESULTS, self._waiting_message(seen.awaiting, now)
        await self.publish(state, reason, message, now, session=session)
        wait = self.config.poll_interval
        if seen.awaiting_results:  # quick while results trickle in, slower while Prometheus is failing
            wait = self.config.metrics_poll_interval if self.metrics_error is None else max(wait, 2.0)
        if decision.wait is not None:  # the session's backoff after failures: come back when it ends
            wait = min(wait, max(decision.wait, 0.05))
        return StepResult(state, wait=wait)

    def _waiting_message(self, awaiting: Mapping[str, float], now: float) -> str:
        """Which units wait for their results, since when, the last Prometheus error, the deadline."""
        units = sorted(awaiting, key=unit_order)
        first = min(awaiting.values())
        deadline = self.config.results_deadline_seconds
        message = (f"waiting for the result of {', '.join(units)}: the pod succeeded, its result is not queryable "
                   f"yet (waiting since {st.now_iso(first)}, {now - first:.0f}s)")
        if self.metrics_error:
            message += f"; last Prometheus error: {self.metrics_error[:300]}"
        return message + (f"; the unit fails MetricsUnavailable at {st.now_iso(first + deadline)} "
                          f"(results deadline {deadline:g}s)")

    # ----------------------------------------------------------------------------------------
    async def _maybe_continue(self, history: History, spec: JobSpec, generation: int | None,
                              pods: dict[str, PodSummary], now: float) -> None:
        """A job stopped by its trial budget continues when maxTrials is raised; a failed baseline
        runs again when the spec was edited since."""
        if can_resume(history, spec):
            message = f"maxTrials raised to {spec.tuning.max_trials}: tuning continues"
        elif (history.stop_reason == stop.BASELINE_FAILED and generation is not None
              and (self.last_status or {}).get("observedGeneration") not in (None, generation)):
            message = f"spec changed (generation {generation}): the baseline runs again"
            failed = pods.pop(protocol.BASELINE_UNIT, None)
            if failed is not None:  # its failure is history: the next start is a new attempt
                self.retired.add(failed.uid)
                self.attempts[protocol.BASELINE_UNIT] = max(self.attempts.get(protocol.BASELINE_UNIT, -1),
                                                            failed.attempt)
                await self.kube.delete_pod(self.job.namespace, failed.name)
            history.message = None
        else:
            return
        logger.info("%s/%s: %s", self.job.namespace, self.job.name, message)
        history.stop_reason = None
        history.outcome = None
        history.started_at = now
        await self._save()
        self.events("Normal", st.RESUMED, message)

    async def _reap(self, owned: list[PodSummary], current: dict[str, PodSummary], now: float) -> None:
        """Force-delete (grace 0) the job's pods that no node will ever finish: stuck terminating past their
        grace period plus a margin, or on a node that is gone or NotReady too long (their status may say
        Running forever), or failed because their node lost the container (a node back from a reboot says
        ContainerStatusUnknown). A unit whose current pod goes so is not running: the session starts it again as
        a new attempt, and no trial is failed for it. Only pods the job owns (ownerReferences uid) are ever
        touched."""
        margin = self.config.terminating_margin_seconds
        for pod in owned:
            if pod.done or not pod.deleting or pod.deleted_at is None or now - pod.deleted_at <= margin:
                continue
            logger.warning("%s/%s: pod %s still terminating %.0fs after its grace period (node %s): force-deleting "
                           "it", self.job.namespace, self.job.name, pod.name, now - pod.deleted_at, pod.node)
            await self.kube.delete_pod(self.job.namespace, pod.name, grace_seconds=0)
            self.events("Warning", "PodForceDeleted", f"pod {pod.name} was stuck terminating on node {pod.node} "
                                                      "past its grace period: force-deleted")
            if current.get(pod.unit) is pod:
                current.pop(pod.unit)
        for unit, pod in list(current.items()):
            if pod.lost_container and not pod.deleting:
                lost: str | None = f"node {pod.node} lost its container ({pod.container_reason})"
            elif pod.done or pod.deleting or not pod.node:
                continue
            else:
                lost = await self._node_lost(pod.node, now)
            if lost is not None:
                await self._replace(unit, pod, lost, current)

    async def _replace(self, unit: str, pod: PodSummary, why: str, current: dict[str, PodSummary]) -> None:
        """Force-delete `unit`'s current pod, lost for `why`: the unit is no longer running (no pod of this process
        is still expected to show up for it, as this one was seen), so the session starts it again."""
        logger.warning("%s/%s: %s: force-deleting pod %s; %s starts again", self.job.namespace, self.job.name, why,
                       pod.name, unit)
        await self.kube.delete_pod(self.job.namespace, pod.name, grace_seconds=0)
        self.events("Warning", "NodeLost", f"pod {pod.name} of {unit}: {why}; the pod was force-deleted and the unit "
                                           "starts again")
        current.pop(unit, None)
        expected = self.expected.get(unit)
        if expected is not None and expected[0] <= pod.attempt:
            self.expected.pop(unit)

    async def _node_lost(self, name: str, now: float) -> str | None:
        """Why node `name` is lost (gone, or NotReady for node_lost_seconds), None while it is fine or
        unknown (the operator may not read nodes: then the node's own status is never guessed)."""
        limit = self.config.node_lost_seconds
        try:
            node = await self._read_node(name, now)
        except ApiException as exc:
            if exc.status in (401, 403):
                if not self.services.nodes_unreadable:
                    logger.warning("cannot read nodes (HTTP %s): pods on lost nodes are not replaced; grant the "
                                   "operator get on nodes (the chart does)", exc.status)
                self.services.nodes_unreadable = True
                return None
            raise
        if node is None:
            since = self.node_lost.setdefault(name, now)
            return f"node {name} no longer exists" if now - since >= limit else None
        ready = next((cond for cond in (node.get("status") or {}).get("conditions") or []
                      if cond.get("type") == "Ready"), None)
        if ready is None or ready.get("status") == "True":
            self.node_lost.pop(name, None)
            return None
        since = self.node_lost.setdefault(name, now)
        if now - since < limit:
            return None
        detail = ready.get("message") or ready.get("reason") or "no heartbeat"
        return f"node {name} is NotReady ({ready.get('status')}) for {now - since:.0f}s: {detail}"

    async def _read_node(self, name: str, now: float) -> dict[str, Any] | None:
        """The Node, read at most every NODE_CACHE_SECONDS for all of the operator's jobs."""
        cached = self.services.nodes.get(name)
        if cached is not None and 0 <= now - cached[0] < NODE_CACHE_SECONDS:
            return cached[1]
        reads = self.services.node_reads
        read = reads.get(name)
        if read is None:
            read = reads[name] = asyncio.ensure_future(self.kube.read_node(name))
            read.add_done_callback(lambda _done: reads.pop(name, None))
        node = await asyncio.shield(read)
        self.services.nodes[name] = (now, node)
        return node

    def _expect(self, current: dict[str, PodSummary], history: History, running: set[str], now: float) -> None:
        """A pod this process just created may be missing from the pod index for a while (its watch event is
        not in yet, e.g. under load): its unit still runs, or the session would start it again under a new
        attempt and the first pod's result would be rejected. (The ReplicaSet controller's 'expectations'.)"""
        for unit, (attempt, since) in list(self.expected.items()):
            pod = current.get(unit)
            if (pod is not None and pod.attempt >= attempt) or recorded(history, unit):
                del self.expected[unit]
            elif now - since > EXPECTATION_SECONDS:
                logger.warning("%s/%s: the pod of %s (attempt %d) created %.0fs ago is not seen: the unit is not "
                               "running", self.job.namespace, self.job.name, unit, attempt, now - since)
                del self.expected[unit]
            else:
                running.add(unit)

    async def _results(self, pods: dict[str, PodSummary], history: History) -> dict[str, Observed]:
        """The job's queryable results: the operator-wide poller's snapshot, plus a query of this job
        when a unit's pod has succeeded and the snapshot lacks its result."""
        poller = self.services.poller
        results = dict(poller.results(self.job.uid)) if poller is not None else {}
        needed = any(pod.phase == "Succeeded" and unit not in results and not recorded(history, unit)
                     for unit, pod in pods.items())
        if needed and self.services.prometheus is not None:
            try:
                results.update(await self.services.prometheus.job_results(self.job.uid))
                self.metrics_error = None
            except MetricsError as exc:
                logger.warning("%s/%s: %s", self.job.namespace, self.job.name, exc)
                self.services.metrics.errors.labels(kind="prometheus").inc()
                self.metrics_error = str(exc)
        elif needed:
            self.metrics_error = "no Prometheus URL configured (--prometheus-url / QTUNE_PROMETHEUS_URL)"
        return results

    def _report_rejections(self, rejected: list[tuple[Observed, str]]) -> None:
        for observed, reason in rejected:
            key = (observed.unit, observed.signature or "")
            if key in self.rejected:
                continue
            self.rejected.add(key)
            self.services.metrics.results_rejected.labels(reason=reason).inc()
            self.events("Warning", "ResultRejected",
                        f"a result for {observed.unit} was ignored ({reason}): it carries no proof that the unit's "
                        "own pod produced it")
            logger.warning("%s/%s: result for %s rejected: %s", self.job.namespace, self.job.name, observed.unit,
                           reason)

    async def _save(self) -> None:
        assert self.history is not None
        try:
            await self.store.save(self.history)
        except HistoryTooLarge as exc:
            raise Terminal(st.HISTORY_TOO_LARGE, str(exc)) from None

    def _count(self, records: list[Any]) -> None:
        metrics = self.services.metrics
        for record in records:
            metrics.trials_finished.labels(status=record.status).inc()
            if not record.ok:
                reason = bounded_reason(record.reason)  # a pod's free text never becomes a label or reason
                detail = "" if reason == record.reason or not record.reason else f"{record.reason[:64]}: "
                metrics.trials_failed.labels(reason=reason).inc()
                self.events("Warning", reason, f"trial {record.index} failed: {detail}{(record.message or '')[:300]}")

    async def _prepare_starts(self, units: list[WorkUnit], save: bool
                              ) -> list[tuple[builders.UnitPlan, dict[str, Any]]]:
        """Store the history (when `save`) and write each start's Secret and inputs, all at once: a dispatch
        waits for two API round trips (these, then the pods) instead of one per object. Any failure is raised
        once every write has ended, and then no pod is created and the Secrets and inputs written are deleted
        again (the next step starts its units under the next attempt: a Secret this step wrote is never taken for
        its own, as any existing one)."""
        assert self.spec is not None
        if units and (any(u.id == protocol.BASELINE_UNIT for u in units) or self.identity is None
                      or self.identity[0] != self.generation):
            try:  # every pod runs as the job's own account, or a named one that is opted in
                self.identity = (self.generation, await ensure_identity(self.kube, self.job, self.spec))
            except SpecError as exc:
                raise Terminal(st.INVALID_SPEC, str(exc)) from None
        outcomes = await asyncio.gather(*([self._save()] if save else []), *(self._prepare(unit) for unit in units),
                                        return_exceptions=True)
        prepared = outcomes[1:] if save else outcomes
        failure = next((item for item in outcomes if isinstance(item, BaseException)), None)
        if failure is not None:
            await self._withdraw([item for item in prepared if not isinstance(item, BaseException)])
            raise failure
        return prepared  # type: ignore[return-value]

    async def _withdraw(self, prepared: list[tuple[builders.UnitPlan, dict[str, Any]]]) -> None:
        """Delete the Secrets and inputs of starts whose pods will not be created (the step failed): no pod ever
        uses them, so nothing else would delete them before the job goes. Best effort: a delete that fails
        leaves its object to the job's deletion (ownerReferences)."""
        names = [body["metadata"]["name"] for _, body in prepared]
        deletes = [self.kube.delete(kind, self.job.namespace, name)
                   for pod in names for kind, name in (("Secret", c.unit_key(pod)), ("ConfigMap", c.unit_inputs(pod)))]
        for outcome in await asyncio.gather(*deletes, return_exceptions=True):
            if isinstance(outcome, Exception):
                logger.warning("%s/%s: a start's Secret or inputs that no pod will use stay until the job is "
                               "deleted: %s", self.job.namespace, self.job.name, outcome)
        self.owned.difference_update(c.unit_inputs(pod) for pod in names)

    async def _prepare(self, unit: WorkUnit) -> tuple[builders.UnitPlan, dict[str, Any]]:
        """Secret and inputs of a new start of `unit` (a new attempt when an older pod exists), and its pod's
        body."""
        assert self.spec is not None
        attempt = self.attempts.get(unit.id, -1) + 1
        self.attempts[unit.id] = attempt
        plan = plan_of(unit, attempt)
        if plan.kind == protocol.BASELINE_UNIT:
            await self._claim(builders.configmap(self.job, c.baseline_configmap(self.job.name), c.ROLE_BASELINE))
        # The operator cannot read Secrets: one it did not just create is never used (it may be anyone's,
        # holding a key its author knows). The unit starts under the next attempt's name instead. The inputs
        # are written alongside (their name is the attempt's); a superseded attempt's are deleted again.
        for _ in range(SECRET_TRIES):
            secret = protocol.derive_unit_secret(self.config.signing_key, self.job.uid, unit.id, attempt)
            secret_body = builders.unit_secret(self.job, plan, secret)
            try:
                inputs = builders.unit_inputs(self.job, self.spec_dict, plan)
            except protocol.PayloadTooLarge as exc:
                raise Terminal("ConfigTooLarge", str(exc)) from None
            created, _ = await gather_all([self.kube.ensure(secret_body), self._claim(inputs)])
            if created:
                break
            logger.warning("%s/%s: Secret %s exists already and is not used (it may not be the job's); %s starts "
                           "as attempt %d", self.job.namespace, self.job.name, secret_body["metadata"]["name"],
                           unit.id, attempt + 1)
            await self.kube.delete("ConfigMap", self.job.namespace, inputs["metadata"]["name"])
            self.owned.discard(inputs["metadata"]["name"])
            attempt += 1
            self.attempts[unit.id] = attempt
            plan = plan_of(unit, attempt)
        else:
            raise ForeignObject("Secret", self.job.namespace, secret_body["metadata"]["name"], previous=False)
        annotations = {f"{c.GROUP}/config-key": str(unit.tune_config and _config_key(unit.tune_config))} \
            if unit.tune_config else None
        return plan, builders.unit_pod(self.job, self.spec, plan, self.config, annotations)

    async def _launch(self, plan: builders.UnitPlan, body: dict[str, Any]) -> None:
        if await self.kube.create_pod(body):
            self.expected[plan.unit] = (plan.attempt, self.services.clock())
            if plan.kind == "trial":
                self.services.metrics.trials_started.inc()
            logger.info("%s/%s: %s started (pod %s)", self.job.namespace, self.job.name, plan.unit,
                        body["metadata"]["name"])

    async def _cleanup(self, history: History, pods: dict[str, PodSummary],
                       finished: TuningSession | None = None) -> None:
        """Pushgateway group, Secret, inputs and (succeeded) pod of every recorded unit, once; then the
        cleanup policy (qtune/operator/cleanup.py): old failed pods, and the models of non-winning trials
        once the job has `finished`."""
        await gather_all(self._clean_unit(unit, pod) for unit, pod in pods.items()
                         if pod.name not in self.cleaned and recorded(history, unit) and pod.done)
        await self._apply_cleanup_policy(pods, finished)

    async def _clean_unit(self, unit: str, pod: PodSummary) -> None:
        """The recorded unit's result group first (kept while the Pushgateway cannot be reached), then its
        Secret, inputs and succeeded pod at once."""
        if self.services.pushgateway is not None:
            try:
                await self.services.pushgateway.delete_group(self.job.uid, unit)
            except MetricsError as exc:
                logger.warning("%s/%s: %s: %s", self.job.namespace, self.job.name, unit, exc)
                return

        async def delete_inputs() -> None:
            inputs = c.unit_inputs(pod.name)
            if inputs in self.owned or await self._read_owned(inputs) is not None:
                await self.kube.delete("ConfigMap", self.job.namespace, inputs)
            self.owned.discard(inputs)

        deletes = [self.kube.delete("Secret", self.job.namespace, c.unit_key(pod.name)), delete_inputs()]
        if pod.phase == "Succeeded" and not self.config.keep_succeeded_pods:
            deletes.append(self.kube.delete_pod(self.job.namespace, pod.name))
        await gather_all(deletes)
        self.cleaned.add(pod.name)

    async def _apply_cleanup_policy(self, pods: dict[str, PodSummary], finished: TuningSession | None) -> None:
        cleaned = [pod for pod in pods.values() if pod.name in self.cleaned]
        for pod in cleanup.failed_pods_to_delete(cleaned, self.config.cleanup_failed_pods):
            await self.kube.delete_pod(self.job.namespace, pod.name)
        if finished is None or self.spec is None or self.models_cleaned == len(finished.history.trials):
            return
        best = finished.best() if finished.ready else None
        front = [entry.trial for entry in session_front(finished)] if finished.ready else []
        unit = cleanup.model_cleanup_unit(self.spec, self.config, best.index if best is not None else None, front)
        self.models_cleaned = len(finished.history.trials)
        running = pods.get(protocol.CLEANUP_UNIT)
        if unit is not None and finished.history.trials and (running is None or running.done):
            attempt = self.attempts[unit.id] = self.attempts.get(unit.id, -1) + 1
            body = cleanup.cleanup_pod(builders.unit_pod(self.job, self.spec, plan_of(unit, attempt), self.config))
            if await self.kube.create_pod(body):
                logger.info("%s/%s: deleting the models of trials other than %s (pod %s)", self.job.namespace,
                            self.job.name, ",".join(map(str, unit.candidates)) or "none", body["metadata"]["name"])

    def _progress(self, session: TuningSession) -> str:
        """The running job's status message, made again only when the stored history changed (finding the best
        ranks every passing trial)."""
        version = (self._history_version(), self.generation)
        if self.progress is None or self.progress[0] != version:
            self.progress = (version, self._describe_progress(session))
        return self.progress[1]

    def _history_version(self) -> tuple[int, str | None] | None:
        """Which history the status is made from: this object as last stored (a reload is a new object)."""
        return None if self.history is None else (id(self.history), self.store.resource_version)

    def _describe_progress(self, session: TuningSession) -> str:
        history = session.history
        assert self.spec is not None
        message = (f"{len(history.finished())}/{self.spec.tuning.max_trials} trials finished, "
                   f"{len(history.pending())} running")
        best = session.best()
        if best is not None:
            message += f"; best so far: trial {best.index} (accuracy {best.accuracy:.4f}"
            measured = session.best_speed()
            message += f", {measured.speedup:.2f}x" if measured is not None else ""
            message += f"; {measured.caveat()})" if measured is not None and measured.caveat() else ")"
        return message

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
        if self.services.pushgateway is not None:
            try:
                await self.services.pushgateway.delete_job_groups(self.job.uid)
            except MetricsError as exc:
                logger.warning("%s/%s: %s", self.job.namespace, self.job.name, exc)
        state = st.state_for_outcome(outcome)
        await self.publish(state, reason, message, now, session=session, stop_reason=history.stop_reason)
        return StepResult(state, done=True)

    # ----------------------------------------------------------------------------------------
    async def publish(self, state: str, reason: str, message: str, now: float,
                      session: TuningSession | None = None, stop_reason: str | None = None) -> None:
        """Write the status (only what changed) and post an Event when the state or reason changes. The status
        is a projection of the stored history and these arguments: while neither changed (most steps of a
        running job), it is not even built again."""
        history, spec = self.history, self.spec
        inputs = (state, reason, message, stop_reason, self.generation, spec is not None, len(self.rejected),
                  session is not None and session.ready, self._history_version())
        if inputs == self.published and state == self.last_state and state not in st.TERMINAL:
            return
        batch = objective_batch_size(spec) if spec is not None else 1
        best = front = None
        if session is not None and session.ready:
            front = st.front_status(session_front(session), batch)
            record = session.best()
            if record is not None:
                measured = session.best_speed()
                confirmation = history.confirmation if history is not None else None
                confirmed = bool(confirmation and confirmation.get("status") == protocol.SUCCEEDED
                                 and record.index in (confirmation.get("candidates") or []))
                model_path = trial_dir(spec, self.job, record.index) + "/model" if spec is not None else None
                best = st.best_status(record, history.baseline if history else None, measured, confirmed,
                                      model_path)
        elapsed = None
        if history is not None:
            elapsed = history.elapsed_seconds + (now - history.started_at if history.started_at else 0.0)
        desired = st.build_status(
            state=state, reason=reason, message=message, generation=self.generation, old=self.last_status,
            history=history if spec is not None else None,
            max_trials=spec.tuning.max_trials if spec is not None else None, batch_size=batch, best=best, front=front,
            recent=self.config.recent_trials, history_configmap=self.store.name if history is not None else None,
            workspace=workspace_dir(spec, self.job) if spec is not None else None,
            stop_reason=stop_reason or (history.stop_reason if history is not None else None), elapsed=elapsed,
            rejected=len(self.rejected), now=now,
        )
        patch = st.status_patch(self.last_status, desired)
        if patch is not None and (set(patch) - {"elapsedSeconds"} or state in st.TERMINAL):
            await self.kube.patch_job_status(self.job.namespace, self.job.name, patch)
            self.last_status = {**{k: v for k, v in (self.last_status or {}).items()
                                   if k not in st.MANAGED_KEYS}, **desired}
        previous = (self.last_state, (self.last_status or {}).get("reason"))
        if state != self.last_state:
            kind = "Warning" if state == st.FAILED_STATE else "Normal"
            self.events(kind, reason if state in st.TERMINAL else state, message)
            logger.info("%s/%s: %s -> %s (%s): %s", self.job.namespace, self.job.name, previous[0], state, reason,
                        message)
        self.last_state = state
        self.published = inputs
        self.services.metrics.job_state(self.job.uid, state)


def _config_key(tune_config: dict[str, Any]) -> str:
    from qtune.tuning.config import TuneConfig

    return TuneConfig.from_dict(tune_config).key()


def api_message(exc: ApiException) -> str:
    """The API server's own message (Status.message), else the HTTP reason."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    return str(body.get("message") or exc.reason or exc)[:500]
