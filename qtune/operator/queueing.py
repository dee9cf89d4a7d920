"""Kueue's own reason for a unit that waits for admission (spec.trial.queueName, docs/kueue.md).

Kueue keeps a Workload per queued pod (owned by the pod); while it cannot admit it, the Workload's condition
``QuotaReserved=False`` says why (``couldn't assign flavors to pod set main: insufficient unused quota for cpu
in flavor ..., 1 more needed``). The operator lists the job namespace's Workloads only while a unit of the job
waits, at most every REFRESH_SECONDS, and never again in this process when the API has no Workloads (Kueue is
not installed: 404) or the operator may not list them (403: a chart older than this rule)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from kubernetes import client

from qtune.operator.context import JobContext
from qtune.operator.podstatus import PodSummary
from qtune.tuning.history import QueueStop

logger = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "kueue.x-k8s.io", "v1beta2", "workloads"
REFRESH_SECONDS = 5.0
MESSAGE_LIMIT = 500


def pending_messages(workloads: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """pod uid -> the message of its Workload's QuotaReserved=False condition (the pods that own a Workload)."""
    messages: dict[str, str] = {}
    for workload in workloads:
        conditions = (workload.get("status") or {}).get("conditions") or []
        pending = next((cond for cond in conditions if cond.get("type") == "QuotaReserved"
                        and cond.get("status") == "False" and cond.get("message")), None)
        if pending is None:
            continue
        for owner in (workload.get("metadata") or {}).get("ownerReferences") or []:
            if owner.get("kind") == "Pod" and owner.get("uid"):
                messages[owner["uid"]] = str(pending["message"])[:MESSAGE_LIMIT]
    return messages


class KueueReasons:
    """The latest pending messages of the job namespace's Workloads, refreshed while the job has queued units."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.messages: dict[str, str] = {}
        self.read_at: float | None = None
        self.unavailable = False

    async def refresh(self, queued: bool, now: float) -> dict[str, str]:
        """pod uid -> Kueue's message; listed again when `queued` and REFRESH_SECONDS have passed."""
        if not queued:
            self.messages = {}
            return self.messages
        if self.unavailable or (self.read_at is not None and now - self.read_at < REFRESH_SECONDS):
            return self.messages
        self.read_at = now
        try:
            body = await self.ctx.kube.list_custom(GROUP, VERSION, self.ctx.job.namespace, PLURAL)
        except client.ApiException as exc:
            if exc.status not in (403, 404):  # best effort: the status keeps the last reason, read again later
                logger.info("%s/%s: listing Kueue Workloads failed (HTTP %s); trying again in %gs",
                            self.ctx.job.namespace, self.ctx.job.name, exc.status, REFRESH_SECONDS)
                return self.messages
            self.unavailable = True
            logger.warning("%s/%s: cannot list Kueue Workloads (HTTP %s): the status names the LocalQueue but not "
                           "Kueue's reason%s", self.ctx.job.namespace, self.ctx.job.name, exc.status,
                           "; grant the operator list on workloads.kueue.x-k8s.io (the chart does)"
                           if exc.status == 403 else "")
            return self.messages
        self.messages = pending_messages(body.get("items") or [])
        return self.messages


class KueueStops:
    """The job's unit pods Kueue stopped (preempted or evicted their Workload: the pod's TerminationTarget
    condition): each named once in a Normal Event, the count and the latest in the job's status message. Kept in
    the history (`History.queue_stops`), so a restarted operator neither names a stop again nor forgets one. Not
    failures: the pod goes, the unit runs again as its next attempt (docs/kueue.md)."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.unsaved: dict[str, QueueStop] = {}
        """Stops noted while no history was loaded (after an API error): moved into the next one loaded."""
        self.unstored = False
        """A stop was noted since the history was last stored for it (see `store`)."""

    def _stops(self) -> dict[str, QueueStop]:
        history = self.ctx.history
        if history is None:
            return self.unsaved
        for name, stop in self.unsaved.items():
            history.queue_stops.setdefault(name, stop)
        self.unsaved = {}
        return history.queue_stops

    def note(self, stopped: Iterable[PodSummary]) -> None:
        """Name each pod Kueue stopped once (those of another job or not the job's own are ignored)."""
        stops = self._stops()
        for pod in sorted(stopped, key=lambda item: item.name):
            if pod.name in stops or not pod.kueue_stopped or not pod.owned_by(self.ctx.job.namespace,
                                                                              self.ctx.job.uid):
                continue
            unit, why = pod.unit, (pod.kueue_stopped or "")[:MESSAGE_LIMIT]
            stops[pod.name] = QueueStop(unit, why)
            kind = "UnitPreempted" if "preempt" in why.lower() else "UnitEvicted"
            self.ctx.events("Normal", kind, f"pod {pod.name} ({unit}) was stopped by Kueue ({why}); not a failure: "
                                            "the unit runs again")
            logger.info("%s/%s: Kueue stopped pod %s (%s): %s", self.ctx.job.namespace, self.ctx.job.name,
                        pod.name, unit, why)
            self.unstored = True

    async def store(self) -> None:
        """Store the history when a stop was noted since: a restarted operator neither names it again nor forgets
        it (a step that stores the history for its own reasons stores the stops too)."""
        if self.unstored and self.ctx.history is not None:
            self._stops()
            await self.ctx.save()
            self.unstored = False

    def status(self, message: str) -> str:
        """`message` with the stops so far (unchanged while there were none)."""
        stops = self._stops()
        if not stops:
            return message
        name, latest = next(reversed(stops.items()))
        count = len(stops)
        return (f"{message}; Kueue preempted or evicted {count} unit pod{'s' if count > 1 else ''} (not failures: "
                f"{'each runs' if count > 1 else 'it runs'} again), the latest {name} ({latest.unit}): {latest.why}")
