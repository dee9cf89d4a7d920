"""What the rooms of one job's loop share: the operator-wide `Services`, the job's `JobContext` (its spec and
history as reconcile.py last loaded them, where the history is stored) and `Terminal`, the exception that ends a
job. No decision is made here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from qtune.operator import status as st
from qtune.operator.config import OperatorConfig
from qtune.operator.kube import Kube
from qtune.operator.layout import JobRef
from qtune.operator.metrics import OperatorMetrics
from qtune.operator.nodes import NodeCache
from qtune.operator.prom import PrometheusClient, PushgatewayClient, ResultsPoller
from qtune.operator.store import OWNED, ForeignObject, HistoryStore, HistoryTooLarge, ownership
from qtune.spec.models import JobSpec
from qtune.tuning.history import History

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EventSink(Protocol):
    def __call__(self, kind: str, reason: str, message: str) -> None: ...


@dataclass
class Services:
    """What every job's loop shares: API clients, settings, the operator's metrics, the nodes cache."""

    kube: Kube
    config: OperatorConfig
    metrics: OperatorMetrics
    prometheus: PrometheusClient | None = None
    pushgateway: PushgatewayClient | None = None
    poller: ResultsPoller | None = None
    clock: Callable[[], float] = time.time
    nodes: NodeCache = field(default_factory=NodeCache)
    """Nodes read for every job (qtune/operator/nodes.py)."""


class Terminal(Exception):
    """The job cannot go on (invalid spec, history too large, API refusals): Failed with this reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class JobContext:
    """One job as every room of its loop sees it. reconcile.py alone sets the spec and the history; the pod
    executor, the status writer and the janitor read them."""

    services: Services
    job: JobRef
    events: EventSink
    spec: JobSpec | None = None
    spec_dict: dict[str, Any] = field(default_factory=dict)
    generation: int | None = None
    history: History | None = None
    """The history as last loaded or saved; None: load it again (after an error, a conflict)."""
    store: HistoryStore = field(init=False)

    def __post_init__(self) -> None:
        self.store = HistoryStore(self.services.kube, self.job, self.services.config.history_plain_limit,
                                  self.services.config.signing_key)

    @property
    def config(self) -> OperatorConfig:
        return self.services.config

    @property
    def kube(self) -> Kube:
        return self.services.kube

    @property
    def metrics(self) -> OperatorMetrics:
        return self.services.metrics

    async def save(self) -> None:
        """Store the history (a history too large for its ConfigMap ends the job)."""
        assert self.history is not None
        self.history.checkpoint(self.services.clock())  # the stored elapsed_seconds is current
        try:
            await self.store.save(self.history)
        except HistoryTooLarge as exc:
            raise Terminal(st.HISTORY_TOO_LARGE, str(exc)) from None

    async def read_owned(self, name: str) -> dict[str, Any] | None:
        """A ConfigMap of the job, None when absent or not this job's (never believed then)."""
        body = await self.kube.read_configmap(self.job.namespace, name)
        if body is not None and ownership(body, self.job) != OWNED:
            logger.warning("%s/%s: %s", self.job.namespace, self.job.name, ForeignObject.of(body, self.job).message)
            return None
        return body


async def gather_all(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """asyncio.gather that lets every awaitable end before raising the first failure (none is left running
    unawaited, e.g. a write the next step would not know about)."""
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for item in results:
        if isinstance(item, BaseException):
            raise item
    return list(results)  # type: ignore[arg-type]
