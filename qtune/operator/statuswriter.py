"""The status writer: a job's `.status` (a projection of the session, built by qtune/operator/status.py), written
only when it changed, its running message (progress, what the job waits for), and the Events a job posts about
its state, its failed trials and the results it rejected."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qtune.operator import status as st
from qtune.operator.context import JobContext
from qtune.operator.layout import trial_dir, workspace_dir
from qtune.operator.observe import unit_order
from qtune.operator.podstatus import bounded_reason
from qtune.operator.results import Observed
from qtune.tuning.best import best_summary
from qtune.tuning.front import session_front
from qtune.tuning.session import TuningSession, objective_batch_size

logger = logging.getLogger(__name__)


@dataclass
class StatusWriter:
    ctx: JobContext
    last_status: dict[str, Any] | None = None
    last_state: str | None = None
    published: tuple[Any, ...] | None = None
    """What the last status written was built from (see `publish`)."""
    progress_made: tuple[Any, str] | None = None
    """(history version, the status message `progress` made for it)."""
    rejected: set[tuple[str, str]] = field(default_factory=set)
    """(unit, signature) of results already rejected (counted and reported once)."""

    def remember(self, body: Mapping[str, Any]) -> None:
        """The status as stored, the first time the job is seen (by this process)."""
        if self.last_status is None:
            self.last_status = dict(body.get("status") or {})
            self.last_state = self.last_status.get("state")

    # ----------------------------------------------------------------------------------------
    # the running job's reason and message
    def running(self, session: TuningSession, confirming: bool) -> tuple[str, str, str]:
        """(state, reason, message) of a job that goes on: the baseline, the confirmation, or the progress."""
        state = st.RUNNING if session.ready else st.BASELINE
        if not session.ready:
            return state, st.REASON_BASELINE, "measuring the fp32 baseline and the tuning space"
        if confirming:
            return state, st.REASON_CONFIRMING, "re-measuring the best candidates against fp32"
        return state, st.REASON_TUNING, self.progress(session)

    def progress(self, session: TuningSession) -> str:
        """The running job's status message, made again only when the stored history changed (finding the best
        ranks every passing trial)."""
        version = (self.history_version(), self.ctx.generation)
        if self.progress_made is None or self.progress_made[0] != version:
            self.progress_made = (version, self._describe_progress(session))
        return self.progress_made[1]

    def history_version(self) -> tuple[int, str | None] | None:
        """Which history the status is made from: this object as last stored (a reload is a new object)."""
        history = self.ctx.history
        return None if history is None else (id(history), self.ctx.store.resource_version)

    def _describe_progress(self, session: TuningSession) -> str:
        history = session.history
        assert self.ctx.spec is not None
        message = (f"{len(history.finished())}/{self.ctx.spec.tuning.max_trials} trials finished, "
                   f"{len(history.pending())} running")
        best = session.best()
        if best is not None:
            message += f"; best so far: trial {best.index} (accuracy {best.accuracy:.4f}"
            measured = session.best_speed()
            message += f", {measured.speedup:.2f}x" if measured is not None else ""
            message += f"; {measured.caveat()})" if measured is not None and measured.caveat() else ")"
        return message

    def waiting_message(self, awaiting: Mapping[str, float], now: float, metrics_error: str | None) -> str:
        """Which units wait for their results, since when, the last Prometheus error, the deadline."""
        units = sorted(awaiting, key=unit_order)
        first = min(awaiting.values())
        deadline = self.ctx.config.results_deadline_seconds
        message = (f"waiting for the result of {', '.join(units)}: the pod succeeded, its result is not queryable "
                   f"yet (waiting since {st.now_iso(first)}, {now - first:.0f}s)")
        if metrics_error:
            message += f"; last Prometheus error: {metrics_error[:300]}"
        return message + (f"; the unit fails MetricsUnavailable at {st.now_iso(first + deadline)} "
                          f"(results deadline {deadline:g}s)")

    # ----------------------------------------------------------------------------------------
    # Events of what was observed and recorded
    def count(self, records: list[Any]) -> None:
        """The operator's metrics of recorded trials, and a Warning Event for each failed one."""
        metrics = self.ctx.metrics
        for record in records:
            metrics.trials_finished.labels(status=record.status).inc()
            if not record.ok:
                reason = bounded_reason(record.reason)  # a pod's free text never becomes a label or reason
                detail = "" if reason == record.reason or not record.reason else f"{record.reason[:64]}: "
                metrics.trials_failed.labels(reason=reason).inc()
                self.ctx.events("Warning", reason,
                                f"trial {record.index} failed: {detail}{(record.message or '')[:300]}")

    def report_rejections(self, rejected: list[tuple[Observed, str]]) -> None:
        job = self.ctx.job
        for observed, reason in rejected:
            key = (observed.unit, observed.signature or "")
            if key in self.rejected:
                continue
            self.rejected.add(key)
            self.ctx.metrics.results_rejected.labels(reason=reason).inc()
            self.ctx.events("Warning", "ResultRejected",
                            f"a result for {observed.unit} was ignored ({reason}): it carries no proof that the "
                            "unit's own pod produced it")
            logger.warning("%s/%s: result for %s rejected: %s", job.namespace, job.name, observed.unit, reason)

    # ----------------------------------------------------------------------------------------
    async def publish(self, state: str, reason: str, message: str, now: float,
                      session: TuningSession | None = None, stop_reason: str | None = None) -> None:
        """Write the status (only what changed) and post an Event when the state or reason changes. The status
        is a projection of the stored history and these arguments: while neither changed (most steps of a
        running job), it is not even built again."""
        ctx = self.ctx
        inputs = (state, reason, message, stop_reason, ctx.generation, ctx.spec is not None, len(self.rejected),
                  session is not None and session.ready, self.history_version())
        if inputs == self.published and state == self.last_state and state not in st.TERMINAL:
            return
        desired = self._desired(state, reason, message, now, session, stop_reason)
        patch = st.status_patch(self.last_status, desired)
        if patch is not None and (set(patch) - {"elapsedSeconds"} or state in st.TERMINAL):
            await ctx.kube.patch_job_status(ctx.job.namespace, ctx.job.name, patch)
            self.last_status = {**{k: v for k, v in (self.last_status or {}).items()
                                   if k not in st.MANAGED_KEYS}, **desired}
        previous = (self.last_state, (self.last_status or {}).get("reason"))
        if state != self.last_state:
            kind = "Warning" if state == st.FAILED_STATE else "Normal"
            ctx.events(kind, reason if state in st.TERMINAL else state, message)
            logger.info("%s/%s: %s -> %s (%s): %s", ctx.job.namespace, ctx.job.name, previous[0], state, reason,
                        message)
        self.last_state = state
        self.published = inputs
        ctx.metrics.job_state(ctx.job.uid, state)

    def _desired(self, state: str, reason: str, message: str, now: float, session: TuningSession | None,
                 stop_reason: str | None) -> dict[str, Any]:
        """The whole status as it should be now."""
        ctx = self.ctx
        history, spec = ctx.history, ctx.spec
        batch = objective_batch_size(spec) if spec is not None else 1
        best, front = self._best_and_front(session, batch)
        return st.build_status(
            state=state, reason=reason, message=message, generation=ctx.generation, old=self.last_status,
            history=history if spec is not None else None,
            max_trials=spec.tuning.max_trials if spec is not None else None, batch_size=batch, best=best, front=front,
            recent=ctx.config.recent_trials, history_configmap=ctx.store.name if history is not None else None,
            workspace=workspace_dir(spec, ctx.job) if spec is not None else None,
            stop_reason=stop_reason or (history.stop_reason if history is not None else None),
            rejected=len(self.rejected), now=now,
        )

    def _best_and_front(self, session: TuningSession | None, batch: int | str) -> tuple[Any, Any]:
        """status.best (the winner so far, its ONE speed figure, confirmed or not) and status.front."""
        if session is None or not session.ready:
            return None, None
        spec = self.ctx.spec
        front = st.front_status(session_front(session), batch)
        summary = best_summary(session)
        if summary is None:
            return None, front
        model_path = trial_dir(spec, self.ctx.job, summary.trial) + "/model" if spec is not None else None
        return st.best_status(summary, model_path, batch), front
