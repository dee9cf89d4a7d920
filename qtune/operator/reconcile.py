"""One QuantizationJob's loop step: the operator's logic, as plain async code (no Kopf here).

A step reads the job (spec, generation), the job's pods (from the operator's pod index) and, when
a finished trial awaits its numbers, the job's results in Prometheus; it then

1. validates the spec (invalid: state Failed, reason InvalidSpec, no pods);
2. loads the history ConfigMap (the record of truth) once;
3. runs the baseline pod until it has published the space and baseline to `<job>-baseline`;
4. records finished trials in index order (pod Succeeded + metrics -> result; metrics missing
   after `metrics_timeout` -> MetricsUnavailable; pod Failed/OOMKilled/too slow -> failed trial),
   saves the history, then deletes Pushgateway groups and succeeded pods;
5. applies the stop rules (TuningSession.hard_stop, finished_reason);
6. adds new pending trials (saved BEFORE their pods are created) and creates missing pods;
7. writes the status (a projection of the history) and posts an Event when the state changes.

Every action is idempotent: pods have deterministic names (409 means "already there"), and a
restarted operator rebuilds everything from the history, the ConfigMaps and the pods it finds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from qtune.operator import constants as c
from qtune.operator import pods as podlib
from qtune.operator import status as st
from qtune.operator.config import OperatorConfig
from qtune.operator.kube import Conflict, Kube
from qtune.operator.metrics import OperatorMetrics
from qtune.operator.prom import MetricsError, PrometheusClient, PushgatewayClient, ResultsPoller
from qtune.operator.store import HistoryStore, decode_published
from qtune.spec.errors import SpecError
from qtune.spec.load import job_from_dict
from qtune.spec.models import JobSpec
from qtune.tuning import stop
from qtune.tuning.history import Baseline, History, TrialRecord
from qtune.tuning.session import TuningSession, objective_batch_size
from qtune.tuning.space import TuningSpace

logger = logging.getLogger(__name__)

METRICS_UNAVAILABLE = "MetricsUnavailable"
ABANDONED = "Abandoned"


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
    document = {"apiVersion": c.API_VERSION, "kind": c.KIND,
                "metadata": {"name": meta["name"], "namespace": meta.get("namespace")}, "spec": spec_dict}
    job = job_from_dict(document)
    problem = podlib.cluster_problem(job.spec)
    if problem is not None:
        raise problem
    return job.spec, spec_dict


def can_resume(history: History, spec: JobSpec) -> bool:
    """A job stopped by its trial budget continues when spec.tuning.maxTrials was raised."""
    return history.stop_reason == stop.MAX_TRIALS and spec.tuning.max_trials > len(history.trials)


def resumable_status(status: Mapping[str, Any], max_trials: int) -> bool:
    """The same decision from the status alone (for the maxTrials field handler)."""
    trials = status.get("trials") or {}
    return (status.get("state") in st.TERMINAL and status.get("stopReason") == stop.MAX_TRIALS
            and max_trials > int(trials.get("started", 0)))


@dataclass
class JobReconciler:
    services: Services
    job: podlib.JobRef
    events: EventSink

    spec: JobSpec | None = None
    spec_dict: dict[str, Any] = field(default_factory=dict)
    generation: int | None = None
    spec_error: str | None = None
    history: History | None = None
    space: TuningSpace | None = None
    last_status: dict[str, Any] | None = None
    last_state: str | None = None
    awaiting_metrics: dict[int, float] = field(default_factory=dict)
    uncleaned: dict[int, bool] = field(default_factory=dict)
    """Recorded trials whose Pushgateway group / succeeded pod still need deleting (value: delete pod)."""
    result_read_at: float | None = None
    """When the last recorded result was read from Prometheus (for the dispatch latency)."""
    query_at: float | None = None
    baseline_checked: bool = False
    unsaved: list[TrialRecord] = field(default_factory=list)
    pods_seen_done: set[int] = field(default_factory=set)
    replaced_pods: set[str] = field(default_factory=set)
    """uids of pods deleted to be replaced (ignored while they linger)."""
    """Trials whose finished pod was already handed to the clean-up (done once per process)."""

    def __post_init__(self) -> None:
        self.store = HistoryStore(self.services.kube, self.job, self.services.config.history_plain_limit)

    @property
    def config(self) -> OperatorConfig:
        return self.services.config

    @property
    def kube(self) -> Kube:
        return self.services.kube

    # ----------------------------------------------------------------------------------------
    async def step(self, body: Mapping[str, Any], pods: Iterable[podlib.PodSummary]) -> StepResult:
        started = time.perf_counter()
        try:
            return await self._step(body, list(pods))
        except Conflict as exc:
            logger.warning("%s/%s: %s; reloading the history", self.job.namespace, self.job.name, exc)
            self.services.metrics.errors.labels(kind="conflict").inc()
            self.history = None
            self.unsaved.clear()
            return StepResult(self.last_state or st.PENDING, wait=self.config.poll_interval)
        except Exception:
            # the in-memory history may hold changes that never reached the ConfigMap: start over
            # from the stored one, so no pod is ever created for a trial the store does not know
            self.history = None
            self.unsaved.clear()
            raise
        finally:
            self.services.metrics.step_seconds.observe(time.perf_counter() - started)

    async def _step(self, body: Mapping[str, Any], pods: list[podlib.PodSummary]) -> StepResult:
        now = self.services.clock()
        meta = body["metadata"]
        generation = meta.get("generation")
        if self.last_status is None:
            self.last_status = dict(body.get("status") or {})
            self.last_state = self.last_status.get("state")

        # 1. the spec
        if generation != self.generation or self.spec is None and self.spec_error is None:
            self.generation = generation
            try:
                self.spec, self.spec_dict = validate(body)
                self.spec_error = None
            except SpecError as exc:
                self.spec, self.spec_error = None, str(exc)
        if self.spec is None:
            await self.publish(st.FAILED_STATE, st.INVALID_SPEC, self.spec_error or "invalid spec", now)
            return StepResult(st.FAILED_STATE, done=True)
        spec = self.spec

        # 2. the history
        if self.history is None:
            self.history = await self.store.load() or History(job=self.job.name)
        history = self.history
        by_trial = {p.trial: p for p in pods if p.job_uid == self.job.uid and p.uid not in self.replaced_pods}
        if history.stop_reason == st.BASELINE_FAILED and self._spec_changed_since_publish(generation):
            await self._retry_baseline(by_trial.pop(c.BASELINE_TRIAL, None), generation)
        if history.stop_reason is not None:
            if not can_resume(history, spec):
                return await self.finished(history.stop_reason, now, save=False)
            logger.info("%s/%s: maxTrials raised to %d: tuning continues", self.job.namespace, self.job.name,
                        spec.tuning.max_trials)
            history.stop_reason = None
            history.started_at = now
            await self.store.save(history)
            self.events("Normal", st.RESUMED, f"maxTrials raised to {spec.tuning.max_trials}: tuning continues")

        # 3. the baseline
        if self.space is None or history.baseline is None:
            ready = await self.baseline_step(by_trial.get(c.BASELINE_TRIAL), now)
            if ready is not None:
                return ready

        # 4-6. trials
        return await self.trials_step(by_trial, now)

    def _spec_changed_since_publish(self, generation: int | None) -> bool:
        published = (self.last_status or {}).get("observedGeneration")
        return published is not None and generation is not None and published != generation

    async def _retry_baseline(self, pod: podlib.PodSummary | None, generation: int | None) -> None:
        """The spec changed after the baseline failed (e.g. resources, constraints): run it again."""
        assert self.history is not None
        if pod is not None:
            if pod.uid:
                self.replaced_pods.add(pod.uid)  # the failed pod may linger in the index for a moment
            await self.kube.delete_pod(self.job.namespace, pod.name)
        self.history.stop_reason = None
        self.baseline_checked = False
        self.awaiting_metrics.pop(-1, None)
        await self.store.save(self.history)
        self.events("Normal", st.RESUMED, f"spec changed (generation {generation}): the baseline runs again")

    # ----------------------------------------------------------------------------------------
    async def baseline_step(self, pod: podlib.PodSummary | None, now: float) -> StepResult | None:
        """None when the space and baseline are known; else the result of this step."""
        assert self.spec is not None and self.history is not None
        history = self.history
        name = c.baseline_configmap(self.job.name)
        published = None
        if not self.baseline_checked or (pod is not None and pod.phase == "Succeeded"):
            published = await self.kube.read_configmap(self.job.namespace, name)
            self.baseline_checked = True
        space_doc = decode_published(published, c.SPACE_KEY)
        baseline_doc = decode_published(published, c.BASELINE_KEY)
        if space_doc is not None and baseline_doc is not None:
            self.space = TuningSpace.from_dict(space_doc)
            if history.baseline is None:
                history.baseline = Baseline(**baseline_doc)
                history.started_at = now
                await self.store.save(history)
                self.events("Normal", "BaselineReady",
                            f"fp32 accuracy {history.baseline.accuracy:.4f}, {len(self.space.ops)} quantizable ops")
            elif history.started_at is None:
                history.started_at = now
            await self._forget_trial(c.BASELINE_TRIAL, pod, delete_pod=pod is not None and pod.phase == "Succeeded")
            return None

        if pod is not None and pod.deleting:
            return StepResult(st.BASELINE, wait=self.config.poll_interval)  # a replaced pod going away
        if pod is None:
            for obj in podlib.runner_rbac(self.job, self.spec.trial.service_account_name):
                await self.kube.ensure(obj)
            await self.kube.ensure(podlib.configmap(self.job, name, c.ROLE_BASELINE))
            body = podlib.baseline_pod(self.job, self.spec, self.spec_dict, self.config)
            if await self.kube.create_pod(body):
                logger.info("%s/%s: baseline pod created", self.job.namespace, self.job.name)
            await self.publish(st.BASELINE, st.REASON_BASELINE, "measuring the fp32 baseline and the tuning space",
                               now)
            return StepResult(st.BASELINE, wait=self.config.poll_interval)
        if pod.phase == "Failed":
            reason, message = podlib.failure_of(pod)
            message = f"the baseline pod failed ({reason}): {message}"
            history.stop_reason = st.BASELINE_FAILED
            await self.store.save(history)
            await self.publish(st.FAILED_STATE, st.BASELINE_FAILED, message, now)
            return StepResult(st.FAILED_STATE, done=True)
        if pod.phase == "Succeeded":
            since = self.awaiting_metrics.setdefault(-1, now)
            if now - since > self.config.metrics_timeout:
                history.stop_reason = st.BASELINE_FAILED
                await self.store.save(history)
                await self.publish(st.FAILED_STATE, st.BASELINE_FAILED,
                                   f"the baseline pod succeeded but did not publish ConfigMap {name} "
                                   f"within {self.config.metrics_timeout:g}s", now)
                return StepResult(st.FAILED_STATE, done=True)
            return StepResult(st.BASELINE, wait=self.config.metrics_poll_interval)
        message = "measuring the fp32 baseline and the tuning space"
        if pod.unschedulable:
            message = f"the baseline pod waits for a node: {pod.unschedulable}"
        await self.publish(st.BASELINE, st.REASON_BASELINE, message, now)
        return StepResult(st.BASELINE, wait=self.config.poll_interval)

    # ----------------------------------------------------------------------------------------
    async def trials_step(self, by_trial: dict[str, podlib.PodSummary], now: float) -> StepResult:
        assert self.spec is not None and self.history is not None and self.space is not None
        assert self.history.baseline is not None
        spec, history = self.spec, self.history
        session = TuningSession(spec, self.space, history.baseline, history)

        # 4. finished trials, in index order
        pending = sorted(history.pending(), key=lambda t: t.index)
        results = await self._results_if_needed(pending, by_trial)
        recorded: list[TrialRecord] = []
        to_launch: list[TrialRecord] = []
        waiting_metrics = False
        trial_limit = spec.tuning.trial_timeout_seconds + self.config.trial_grace_seconds
        for record in pending:
            pod = by_trial.get(str(record.index))
            result = (results or {}).get(str(record.index))
            if pod is None or pod.deleting:
                if result is not None:
                    recorded.append(self._record(session, record.index, result, pod))
                elif pod is None:
                    to_launch.append(record)
                continue
            if not pod.done and result is not None and result.get("status") == "succeeded":
                # pushed and queryable: the runner is done; the pod goes once it is reported finished
                recorded.append(self._record(session, record.index, result, pod, delete_pod=False))
                continue
            if pod.phase == "Succeeded":
                if result is not None:
                    recorded.append(self._record(session, record.index, result, pod))
                    continue
                since = self.awaiting_metrics.setdefault(record.index, now)  # this process's clock
                if now - since > self.config.metrics_timeout:
                    recorded.append(self._fail(session, record.index, METRICS_UNAVAILABLE,
                                               f"the pod succeeded but its metrics were not queryable in "
                                               f"Prometheus within {self.config.metrics_timeout:g}s", True))
                else:
                    waiting_metrics = True
            elif pod.phase == "Failed":
                reason, message = podlib.failure_of(pod)
                recorded.append(self._fail(session, record.index, reason, message, False))
            elif pod.started is not None and now - pod.started > trial_limit:
                await self.kube.delete_pod(self.job.namespace, pod.name)
                recorded.append(self._fail(session, record.index, "Timeout",
                                           f"the trial ran longer than {spec.tuning.trial_timeout_seconds}s "
                                           "(spec.tuning.trialTimeoutSeconds) and was deleted", False))
        self.unsaved.extend(recorded)
        # pods of trials recorded earlier (e.g. before an operator restart) are not run again
        done = {str(t.index) for t in history.finished()}
        for trial, pod in by_trial.items():
            if trial not in done or pod.phase != "Succeeded" or pod.deleting:
                continue
            if int(trial) not in self.pods_seen_done:
                self.pods_seen_done.add(int(trial))
                self.uncleaned[int(trial)] = True

        # 5. stop rules (the history is saved by `finished`)
        elapsed = history.elapsed_seconds + (now - history.started_at if history.started_at else 0.0)
        reason = session.hard_stop(elapsed)
        if reason:
            return await self._hard_stop(session, reason, by_trial, now)
        if not history.pending():
            reason = session.finished_reason()
            if reason:
                return await self.finished(reason, now)

        # 6. new trials: results and new pending trials are saved in one write BEFORE any pod of
        # them exists; then the pods (concurrently); clean-up comes after, off the critical path
        slots = spec.tuning.parallel_trials - len(history.pending())
        new = session.start_trials(slots) if slots > 0 else []
        if recorded or new:
            await self._save()
        if not new and not history.pending():
            return await self.finished(stop.SEARCH_EXHAUSTED, now)
        launches = to_launch + new
        if launches:
            await asyncio.gather(*(self._launch(record) for record in launches))
        await self._cleanup()

        running = [by_trial.get(str(r.index)) for r in history.pending()]
        waiting = [p.unschedulable for p in running if p is not None and p.unschedulable]
        message = f"{len(history.finished())}/{spec.tuning.max_trials} trials finished, " \
                  f"{len(history.pending())} running"
        best = session.best()
        if best is not None:
            message += f"; best so far: trial {best.index} (accuracy {best.accuracy:.4f})"
        if waiting:
            message += f"; waiting for a node: {waiting[0]}"
        await self.publish(st.RUNNING, st.REASON_TUNING, message, now, session=session)
        wait = self.config.metrics_poll_interval if waiting_metrics else self.config.poll_interval
        return StepResult(st.RUNNING, wait=wait)

    async def _results_if_needed(self, pending: list[TrialRecord],
                                 by_trial: dict[str, podlib.PodSummary]) -> dict[str, dict[str, Any]] | None:
        """The job's queryable results: the operator-wide poller's latest snapshot, plus a query of
        this job when a pending trial's pod is finished (or gone) and the snapshot lacks its result."""
        poller = self.services.poller
        results = dict(poller.results(self.job.uid)) if poller is not None else {}
        self.query_at = poller.taken_at if poller is not None else None
        needed = False
        for record in pending:
            pod = by_trial.get(str(record.index))
            if (pod is None or pod.deleting or pod.phase == "Succeeded") and str(record.index) not in results:
                needed = True
                break
        if needed and self.services.prometheus is not None:
            try:
                results.update(await self.services.prometheus.job_results(self.job.uid))
                self.query_at = self.services.clock()
            except MetricsError as exc:
                logger.warning("%s/%s: %s", self.job.namespace, self.job.name, exc)
                self.services.metrics.errors.labels(kind="prometheus").inc()
        return results

    def _trial_dir(self, index: int) -> str:
        assert self.spec is not None
        return podlib.trial_dir(self.spec, self.job, index)

    def _record(self, session: TuningSession, index: int, result: dict[str, Any],
                pod: podlib.PodSummary | None, delete_pod: bool = True) -> TrialRecord:
        result = dict(result)
        if result.get("status") == "succeeded":
            result["model_path"] = (podlib.model_path_of(pod) if pod else None) or f"{self._trial_dir(index)}/model"
        elif pod is not None and pod.phase == "Failed":
            reason, message = podlib.failure_of(pod)
            result.setdefault("reason", reason)
            result.setdefault("message", message)
        else:
            result.setdefault("reason", "TrialError")
            result.setdefault("message", "the trial reported failure (see the pod's log)")
        self.awaiting_metrics.pop(index, None)
        self.uncleaned[index] = delete_pod and pod is not None and result.get("status") == "succeeded"
        if pod is not None and delete_pod:
            self.pods_seen_done.add(index)
        if self.result_read_at is None:
            self.result_read_at = self.query_at
        return session.record_result(index, result)

    def _fail(self, session: TuningSession, index: int, reason: str, message: str, delete_pod: bool) -> TrialRecord:
        self.awaiting_metrics.pop(index, None)
        self.uncleaned[index] = delete_pod
        return session.fail(index, reason, message)

    async def _save(self) -> None:
        """Save the history; then count (metrics, Events) the trials recorded since the last save."""
        assert self.history is not None
        await self.store.save(self.history)
        for record in self.unsaved:
            self._count(record)
        self.unsaved.clear()

    def _count(self, record: TrialRecord) -> None:
        metrics = self.services.metrics
        metrics.trials_finished.labels(status=record.status).inc()
        if not record.ok:
            metrics.trials_failed.labels(reason=record.reason or "Unknown").inc()
            self.events("Warning", record.reason or "TrialFailed",
                        f"trial {record.index} failed: {(record.message or '')[:300]}")

    async def _cleanup(self) -> None:
        """Delete Pushgateway groups (and succeeded pods) of recorded trials; retried until done."""
        for index, delete_pod in list(self.uncleaned.items()):
            try:
                await self._forget_trial(str(index), None, delete_pod)
            except MetricsError as exc:
                logger.warning("%s/%s: trial %d: %s", self.job.namespace, self.job.name, index, exc)
                continue
            self.uncleaned.pop(index, None)

    async def _forget_trial(self, trial: str, pod: podlib.PodSummary | None, delete_pod: bool) -> None:
        if self.services.pushgateway is not None:
            await self.services.pushgateway.delete_group(self.job.uid, trial)
        if delete_pod and not self.config.keep_succeeded_pods:
            name = c.baseline_pod(self.job.name) if trial == c.BASELINE_TRIAL else c.trial_pod(self.job.name,
                                                                                            int(trial))
            await self.kube.delete_pod(self.job.namespace, name)

    async def _launch(self, record: TrialRecord) -> None:
        assert self.spec is not None
        body = podlib.trial_pod(self.job, self.spec, self.spec_dict, record.index, record.tune_config, self.config,
                                record.config_key)
        if await self.kube.create_pod(body):
            self.services.metrics.trials_started.inc()
            if self.result_read_at is not None:
                self.services.metrics.dispatch_latency.observe(self.services.clock() - self.result_read_at)
                self.result_read_at = None
            logger.info("%s/%s: trial %d started", self.job.namespace, self.job.name, record.index)

    async def _hard_stop(self, session: TuningSession, reason: str, by_trial: dict[str, podlib.PodSummary],
                         now: float) -> StepResult:
        message = ("stopped: the tuning ran out of its wall-clock limit" if reason == stop.TIMEOUT
                   else f"stopped: {reason}")
        for record in list(session.history.pending()):
            pod = by_trial.get(str(record.index))
            if pod is not None:
                await self.kube.delete_pod(self.job.namespace, pod.name)
            session.fail(record.index, reason if reason == stop.TIMEOUT else ABANDONED, message)
        return await self.finished(reason, now)

    # ----------------------------------------------------------------------------------------
    async def finished(self, reason: str, now: float, save: bool = True) -> StepResult:
        """Terminal: record the stop reason, clean up, publish Succeeded/Failed."""
        assert self.history is not None and self.spec is not None
        history = self.history
        if save:
            history.stop_reason = reason
            if history.started_at:
                history.elapsed_seconds += now - history.started_at
            history.started_at = None
            await self._save()
            await self._cleanup()
            if self.services.pushgateway is not None:
                try:
                    await self.services.pushgateway.delete_job_groups(self.job.uid)
                except MetricsError as exc:
                    logger.warning("%s/%s: %s", self.job.namespace, self.job.name, exc)
        if reason == st.BASELINE_FAILED:
            state, outcome = st.FAILED_STATE, reason
            message = (self.last_status or {}).get("message") or "the baseline failed"
            await self.publish(state, outcome, message, now)
            return StepResult(state, done=True)
        session = None
        if self.space is None:
            published = await self.kube.read_configmap(self.job.namespace, c.baseline_configmap(self.job.name))
            space_doc = decode_published(published, c.SPACE_KEY)
            self.space = TuningSpace.from_dict(space_doc) if space_doc else None
        if self.space is not None and history.baseline is not None:
            session = TuningSession(self.spec, self.space, history.baseline, history)
        best = session.best() if session else None
        outcome = reason if best is not None else stop.NO_CONFIG
        if reason == stop.TOO_MANY_FAILURES:
            outcome = reason
        state = st.state_for_outcome(outcome)
        summary = st.best_summary(best, history.baseline, objective_batch_size(self.spec)) if best else None
        message = f"{reason}: " + st.describe_best(summary, history.baseline)
        await self.publish(state, outcome, message, now, session=session, stop_reason=reason)
        return StepResult(state, done=True)

    # ----------------------------------------------------------------------------------------
    async def publish(self, state: str, reason: str, message: str, now: float,
                      session: TuningSession | None = None, stop_reason: str | None = None) -> None:
        """Write the status (only what changed) and post an Event when the state or reason changes."""
        history = self.history
        spec = self.spec
        batch = objective_batch_size(spec) if spec is not None else 1
        best = session.best() if session is not None else None
        desired = st.build_status(
            state=state, reason=reason, message=message, generation=self.generation, old=self.last_status,
            history=history if spec is not None and history is not None else None,
            max_trials=spec.tuning.max_trials if spec is not None else None, batch_size=batch, best=best,
            recent=self.config.recent_trials, history_configmap=self.store.name if history is not None else None,
            workspace=podlib.workspace_dir(spec, self.job) if spec is not None else None,
            stop_reason=stop_reason or (history.stop_reason if history is not None else None), now=now,
        )
        if history is not None and history.started_at:
            desired["elapsedSeconds"] = round(history.elapsed_seconds + now - history.started_at, 1)
        patch = st.status_patch(self.last_status, desired)
        if patch is not None:
            # elapsedSeconds alone is not worth an API call
            if set(patch) - {"elapsedSeconds"} or state in st.TERMINAL:
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
        self.services.metrics.job_state(self.job.uid, state)
