"""The blocking form of the tuning loop, for executors that can wait (local processes, tests).

`drive` turns the session's decisions into executor calls until the session says the job is
over. The operator runs the very same turn (record -> advance -> apply) once per reconcile step
instead of blocking; see docs/engine.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from qtune.protocol import BaselineResult, ConfirmResult, TrialResult
from qtune.tuning.history import TrialRecord
from qtune.tuning.session import TuningSession, WorkUnit
from qtune.tuning.space import TuningSpace

logger = logging.getLogger(__name__)


@dataclass
class UnitFailure:
    """A unit that ended without a result: why, in the session's vocabulary."""

    reason: str
    message: str


@dataclass
class UnitOutcome:
    unit_id: str
    result: BaselineResult | TrialResult | ConfirmResult | UnitFailure
    space: TuningSpace | None = None
    """The baseline unit's tuning space."""


class Executor(Protocol):
    """Starts, polls and cancels units; knows nothing of tuning."""

    capacity: int

    def running(self) -> set[str]: ...
    def start(self, unit: WorkUnit) -> None: ...
    def cancel(self, unit_ids: list[str]) -> None: ...
    def poll(self, wait: float) -> list[UnitOutcome]: ...


class Listener(Protocol):
    def unit_started(self, unit: WorkUnit) -> None: ...
    def unit_finished(self, unit_id: str, record: TrialRecord | None, session: TuningSession) -> None: ...


class Interrupted(KeyboardInterrupt):
    """The user asked to stop (SIGINT/SIGTERM), raised at a safe point of the loop."""


def apply_outcome(session: TuningSession, outcome: UnitOutcome) -> TrialRecord | None:
    """Feed one finished unit to the session."""
    if isinstance(outcome.result, UnitFailure):
        return session.record_unit_failure(outcome.unit_id, outcome.result.reason, outcome.result.message)
    return session.record(outcome.unit_id, outcome.result, outcome.space)


def drive(session: TuningSession, executor: Executor, save: Callable[[], None],
          listener: Listener | None = None, interrupted: Callable[[], bool] = lambda: False,
          poll_wait: float = 0.5, sleep: Callable[[float], None] = time.sleep) -> str:
    """Run the job to its end; returns the stop reason. The history is saved after every change and
    before any unit starts, so a crash at any point loses no recorded result and repeats no unit.
    The time is the session's clock. A backoff the session asks for (`Decision.wait`) is slept when no
    unit runs (`sleep`, so a test with a fake clock advances it), else waited for in the executor's poll."""
    while True:
        if interrupted():
            raise Interrupted()
        decision = session.advance(frozenset(executor.running()), executor.capacity)
        if decision.cancel:
            executor.cancel(decision.cancel)
        if decision.changed:
            save()
        if decision.finished:
            return decision.finished
        for unit in decision.start:
            executor.start(unit)
            if listener is not None:
                listener.unit_started(unit)
        if decision.wait is not None and not decision.start and not executor.running():
            sleep(decision.wait)
            continue
        wait = poll_wait if decision.wait is None else min(poll_wait, decision.wait)
        for outcome in executor.poll(wait):
            record = apply_outcome(session, outcome)
            save()
            if listener is not None:
                listener.unit_finished(outcome.unit_id, record, session)
