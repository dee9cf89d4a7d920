"""Node health: whether the node a job's pod runs on is lost (gone, or NotReady for node_lost_seconds), read
through one cache every job of the operator shares, and what the job says while a pod of it waits for a node
(reason Unschedulable after unschedulable_seconds, one Warning Event per pod).

The pod executor (qtune/operator/pods.py) force-deletes the pods on lost nodes; the session starts their units
again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kubernetes.client import ApiException

from qtune.operator import status as st
from qtune.operator.kube import Kube
from qtune.operator.observe import Observation

if TYPE_CHECKING:
    from qtune.operator.context import JobContext

logger = logging.getLogger(__name__)

NODE_CACHE_SECONDS = 10.0


@dataclass
class NodeCache:
    """The operator's nodes, for all of its jobs: one read serves every job for NODE_CACHE_SECONDS."""

    entries: dict[str, tuple[float, dict[str, Any] | None]] = field(default_factory=dict)
    """Node name -> (read at, Node or None when gone)."""
    reads: dict[str, asyncio.Future[dict[str, Any] | None]] = field(default_factory=dict)
    """Node reads in flight: every job waiting on a node shares one request."""
    unreadable: bool = False
    """The operator may not read nodes (403): pods on lost nodes are left to the cluster."""

    async def read(self, kube: Kube, name: str, now: float) -> dict[str, Any] | None:
        """The Node, read at most every NODE_CACHE_SECONDS for all of the operator's jobs."""
        cached = self.entries.get(name)
        if cached is not None and 0 <= now - cached[0] < NODE_CACHE_SECONDS:
            return cached[1]
        reads = self.reads
        read = reads.get(name)
        if read is None:
            read = reads[name] = asyncio.ensure_future(kube.read_node(name))
            read.add_done_callback(lambda _done: reads.pop(name, None))
        node = await asyncio.shield(read)
        self.entries[name] = (now, node)
        return node


@dataclass
class NodeHealth:
    """One job's view of the nodes its pods run on (this process's clock)."""

    ctx: JobContext
    lost_since: dict[str, float] = field(default_factory=dict)
    """node name -> since when this process sees it gone (its own clock; NotReady has the node's own time)."""
    reported: set[str] = field(default_factory=set)
    """Pods whose Unschedulable Event was posted (once each)."""

    async def read(self, name: str, now: float) -> dict[str, Any] | None:
        return await self.ctx.services.nodes.read(self.ctx.kube, name, now)

    async def lost(self, name: str, now: float) -> str | None:
        """Why node `name` is lost (gone, or NotReady for node_lost_seconds), None while it is fine or
        unknown (the operator may not read nodes: then the node's own status is never guessed)."""
        limit = self.ctx.config.node_lost_seconds
        cache = self.ctx.services.nodes
        try:
            node = await self.read(name, now)
        except ApiException as exc:
            if exc.status in (401, 403):
                if not cache.unreadable:
                    logger.warning("cannot read nodes (HTTP %s): pods on lost nodes are not replaced; grant the "
                                   "operator get on nodes (the chart does)", exc.status)
                cache.unreadable = True
                return None
            raise
        if node is None:
            since = self.lost_since.setdefault(name, now)
            return f"node {name} no longer exists" if now - since >= limit else None
        ready = next((cond for cond in (node.get("status") or {}).get("conditions") or []
                      if cond.get("type") == "Ready"), None)
        if ready is None or ready.get("status") == "True":
            self.lost_since.pop(name, None)
            return None
        since = self.lost_since.setdefault(name, now)
        if now - since < limit:
            return None
        detail = ready.get("message") or ready.get("reason") or "no heartbeat"
        return f"node {name} is NotReady ({ready.get('status')}) for {now - since:.0f}s: {detail}"

    def waiting(self, seen: Observation, reason: str, message: str, now: float,
                then: Callable[[], str]) -> tuple[str, str]:
        """The running job's (reason, message) while a pod of it waits for a node: the scheduler's message is
        added; after unschedulable_seconds the reason is Unschedulable (`then`: what the job does meanwhile) and
        one Warning Event is posted for the pod."""
        if not seen.waiting_for_node:
            return reason, message
        message += f"; waiting for a node: {seen.waiting_for_node}"
        since = seen.unschedulable_since
        if since is None or now - since < self.ctx.config.unschedulable_seconds:
            return reason, message
        message = (f"pod {seen.unschedulable_pod} cannot be scheduled for {now - since:.0f}s: "
                   f"{seen.waiting_for_node}; {then()}")
        if seen.unschedulable_pod not in self.reported:
            self.reported.add(seen.unschedulable_pod or "")
            self.ctx.events("Warning", st.UNSCHEDULABLE, f"pod {seen.unschedulable_pod}: {seen.waiting_for_node}")
        return st.UNSCHEDULABLE, message
