"""Unit Secrets written ahead (issue 20): one API round trip less between a trial's result and the next trial's pod.

A step that starts a trial also issues the attempt of the trial after it (the spare): the attempt is stored in the
history that step stores anyway (so no unit secret exists whose attempt the stored history lacks), and its Secret
is written after that step's pods. The step that starts the spare's trial then stores its history while it
creates the trial's pod, which carries its inputs (one round trip, not three; two when the inputs need their own
ConfigMap: qtune/operator/pods.py).

Only a Secret this process created is ever taken (`ready`, in memory): a restarted operator takes a new attempt
(the stored one is issued), as it cannot read Secrets. A spare is taken only while its attempt is still the unit's
latest in the history held and among the pods seen. The janitor deletes the spares this process wrote that no pod
used once the job finished (qtune/operator/cleanup.py); an earlier process's goes with the job (ownerReferences):
the operator deletes a Secret by name only when it created it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from qtune import protocol
from qtune.operator import builders
from qtune.operator.context import JobContext
from qtune.tuning.session import WorkUnit

logger = logging.getLogger(__name__)


@dataclass
class Spares:
    ctx: JobContext
    ready: dict[str, int] = field(default_factory=dict)
    """unit -> the attempt whose Secret this process wrote ahead of the unit's start."""
    written: set[str] = field(default_factory=set)
    """Names of the Secrets this process wrote ahead (the janitor deletes those no pod used once the job finished)."""
    plan: builders.UnitPlan | None = None
    """The spare issued in the history being stored: its Secret is written after the step's pods (`write`)."""

    def take(self, unit: str, latest: int | None) -> int | None:
        """The attempt whose Secret was written ahead for `unit`, while it is the unit's latest in the history held
        and among the pods seen (`latest`); None: the unit takes a new attempt."""
        attempt = self.ready.pop(unit, None)
        history = self.ctx.history
        assert history is not None
        if attempt is None or history.attempts.get(unit) != attempt or latest != attempt:
            return None
        return attempt

    def issue(self, units: list[WorkUnit], issue: Callable[[str], int]) -> None:
        """The next trial becomes the spare when this step starts a trial and more may follow: `issue` records its
        attempt in the history (stored by this step before any Secret)."""
        history, spec = self.ctx.history, self.ctx.spec
        assert history is not None and spec is not None
        self.plan = None
        if not any(u.kind == protocol.UnitKind.TRIAL for u in units) or len(history.trials) >= spec.tuning.max_trials:
            return
        index = history.next_index()
        unit = protocol.trial_unit(index)
        if unit not in history.attempts and unit not in self.ready:
            self.plan = builders.UnitPlan(unit=unit, attempt=issue(unit), trial=index)

    async def write(self) -> None:
        """The spare's Secret (its attempt is stored): ready for its unit's start. Best effort: without it the unit
        takes the next attempt when it starts."""
        plan, self.plan = self.plan, None
        if plan is None:
            return
        ctx = self.ctx
        secret = protocol.derive_unit_secret(ctx.config.signing_key, ctx.job.uid, plan.unit, plan.attempt)
        body = builders.unit_secret(ctx.job, plan, secret)
        try:
            if await ctx.kube.ensure(body):
                self.ready[plan.unit] = plan.attempt
                self.written.add(body["metadata"]["name"])
        except Exception as exc:  # noqa: BLE001 - the spare only saves a round trip later
            logger.warning("%s/%s: the Secret of %s, written ahead, is not: %s", ctx.job.namespace, ctx.job.name,
                           plan.unit, exc)
