"""Pushgateway groups of jobs that no longer exist are swept by a periodic operator task.

Jobs carry no finalizer (deleting a job, or the CRD after `helm uninstall`, never waits for the
operator or the Pushgateway): pods, ConfigMaps and Secrets go with the job through their
ownerReferences (the garbage collector), and the result groups a deleted job left in the
Pushgateway are deleted here, whenever the Pushgateway answers. Only groups of qtune's own push job
(`qtune_result`) are ever touched, and only when their job uid is not a live job.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from kubernetes.client import ApiException

from qtune.operator.prom import PUSH_JOB, MetricsError, PushgatewayClient

logger = logging.getLogger(__name__)


def orphan_groups(groups: list[dict[str, str]], live: set[str] | None, deleted: set[str]) -> list[dict[str, str]]:
    """The full grouping labels of qtune groups whose job is gone: not in `live` (None: unknown, then only the
    uids known `deleted` go). Any group of job `qtune_result` counts, whatever other labels it was pushed with
    (one pushed beside a result to spoil it goes with the result)."""
    out = []
    for group in groups:
        uid = group.get("job_uid") or ""
        if group.get("job") != PUSH_JOB or not uid:
            continue
        if (live is not None and uid not in live) or (live is None and uid in deleted):
            out.append(dict(group))
    return out


class GroupSweeper:
    """Every `interval` seconds: delete the Pushgateway groups of jobs that do not exist."""

    def __init__(self, pushgateway: PushgatewayClient, live_uids: Callable[[], Awaitable[set[str]]],
                 interval: float, deleted: set[str], errors: Any | None = None) -> None:
        self.pushgateway = pushgateway
        self.live_uids = live_uids
        self.interval = interval
        self.deleted = deleted
        """uids of jobs this operator saw deleted (what it may sweep when it cannot list every job)."""
        self.errors = errors
        self.swept = 0

    async def sweep_once(self) -> int:
        # the groups first: a job created after this read cannot have a group in it
        groups = await self.pushgateway.groups()
        if not any(g.get("job") == PUSH_JOB for g in groups):
            return 0
        try:
            live: set[str] | None = await self.live_uids()
        except ApiException as exc:
            if exc.status not in (401, 403):
                raise
            live = None  # may not list every job: sweep only what it saw deleted
        doomed = orphan_groups(groups, live, self.deleted)
        swept = sum([await self.pushgateway.delete_labels(group) for group in doomed])  # a 404 deleted nothing
        uids = {group["job_uid"] for group in doomed}
        if doomed:
            logger.info("swept %d Pushgateway group(s) of %d deleted job(s)", swept, len(uids))
        self.deleted.difference_update(uids)
        self.swept += swept
        return swept

    async def run(self) -> None:
        """Sweep until cancelled; a failure (the Pushgateway down) is logged and retried next period."""
        while True:
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except (MetricsError, ApiException, OSError) as exc:
                logger.warning("Pushgateway sweep failed, retrying in %gs: %s", self.interval,
                               str(exc).splitlines()[0] if str(exc) else repr(exc))
                self._count("sweep")
            except Exception as exc:  # noqa: BLE001 - a bug must not end the sweeps
                logger.exception("Pushgateway sweep failed")
                self._count(f"sweep_{type(exc).__name__}")
            await asyncio.sleep(self.interval)

    def _count(self, kind: str) -> None:
        if self.errors is not None:
            self.errors.labels(kind=kind[:64]).inc()
