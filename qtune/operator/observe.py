"""observe: a job's pods and results -> which units run and the outcome of each finished one (pure).

A result is believed only with proof of origin (qtune/operator/results.py), else a failure is read from the pod
(OOMKilled, Crashed, Timeout, MetricsUnavailable ...); a succeeded unit waits for its result up to the results
deadline (WaitingForResults); pods past their time limit fail. The I/O around it (the pods, Prometheus, the
published space) is the pod executor's (qtune/operator/pods.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from qtune import protocol
from qtune.operator.config import RESULTS_DEADLINE_DEFAULT
from qtune.operator.layout import JobRef
from qtune.operator.podstatus import PodSummary, failure_of
from qtune.operator.results import ACCEPT, STALE, WAIT, Observed, judge
from qtune.operator.status import QUEUED
from qtune.tuning import stop
from qtune.tuning.engine import UnitFailure, UnitOutcome
from qtune.tuning.history import History
from qtune.tuning.space import TuningSpace

METRICS_UNAVAILABLE = "MetricsUnavailable"


def unit_order(unit: str) -> tuple[int, int]:
    """baseline, trial-0, trial-1, ..., confirm: the order outcomes are recorded in."""
    index = protocol.unit_trial_index(unit)
    if unit == protocol.UnitKind.BASELINE:
        return (0, 0)
    return (1, index) if index is not None else (2, 0)


def recorded(history: History, unit: str) -> bool:
    """The session has this unit's outcome (its pod is no longer 'running')."""
    if unit == protocol.UnitKind.BASELINE:
        return history.baseline is not None or history.stop_reason == stop.BASELINE_FAILED
    if unit == protocol.UnitKind.CONFIRM:
        done = history.confirmation
        return done is not None and done.trials_seen == len(history.trials)
    index = protocol.unit_trial_index(unit)
    record = next((t for t in history.trials if t.index == index), None)
    return record is None or record.done


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
    queued: dict[str, PodSummary] = field(default_factory=dict)
    """unit -> its pod that Kueue has not admitted yet (spec.trial.queueName; still in `running`)."""
    kueue_stopped: dict[str, PodSummary] = field(default_factory=dict)
    """unit -> its pod going away because Kueue preempted or evicted it (not a failure: the unit runs again)."""

    @property
    def awaiting_results(self) -> bool:
        return bool(self.awaiting)


def observe(job: JobRef, history: History, pods: dict[str, PodSummary], results: Mapping[str, Observed],
            space: TuningSpace | None, signing_key: str, awaiting: dict[str, float], now: float,
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
        elif pod.phase == "Succeeded":
            accepted = results[unit] if verdicts.get(unit) == ACCEPT else None
            _succeeded(seen, unit, pod, accepted, space, awaiting, now, limits)
        elif not pod.deleting:  # one going away without a result: the session starts the unit again if it wants
            _not_succeeded(seen, unit, pod, now, limits)
        elif pod.kueue_stopped:
            seen.kueue_stopped[unit] = pod
    return seen


def _succeeded(seen: Observation, unit: str, pod: PodSummary, accepted: Observed | None,
               space: TuningSpace | None, awaiting: dict[str, float], now: float, limits: Limits) -> None:
    """A succeeded pod: its accepted result (the baseline's with its published space), else it waits for one
    until the results deadline, then the unit fails MetricsUnavailable."""
    outcome = None
    if accepted is not None:
        if unit != protocol.UnitKind.BASELINE:
            outcome = UnitOutcome(unit, accepted.result)
        elif space is not None:
            outcome = UnitOutcome(unit, accepted.result, space)
    if outcome is not None:
        awaiting.pop(unit, None)
        seen.outcomes.append(outcome)
        return
    since = awaiting.setdefault(unit, now)
    if now - since > limits.results_deadline:
        awaiting.pop(unit, None)
        what = "its signed result and the published tuning space were" if unit == protocol.UnitKind.BASELINE \
            else "its signed result was"
        seen.outcomes.append(UnitOutcome(unit, UnitFailure(
            METRICS_UNAVAILABLE, f"the pod {pod.name} succeeded but {what} not available (Prometheus, "
                                 f"ConfigMap) within {limits.results_deadline:g}s")))
    else:
        seen.running.add(unit)
        seen.awaiting[unit] = since


def _not_succeeded(seen: Observation, unit: str, pod: PodSummary, now: float, limits: Limits) -> None:
    """A failed pod fails its unit; so does one past its time limit (then deleted); any other runs."""
    if pod.phase == "Failed":
        failure = failure_of(pod)
    elif (overdue := _overdue(unit, pod, now, limits)) is not None:
        failure = overdue
        seen.doomed.append(pod.name)
    else:
        seen.running.add(unit)
        if pod.queued:
            seen.queued[unit] = pod
        if pod.unschedulable and seen.waiting_for_node is None:
            seen.waiting_for_node = pod.unschedulable
            seen.unschedulable_since = pod.unschedulable_since
            seen.unschedulable_pod = pod.name
        return
    reason, message = failure
    if unit == protocol.UnitKind.BASELINE:
        message = protocol.termination_message(reason, message)
    seen.outcomes.append(UnitOutcome(unit, UnitFailure(reason, message)))


def _overdue(unit: str, pod: PodSummary, now: float, limits: Limits) -> tuple[str, str] | None:
    """(reason, message) when a pod that has not finished is past its unit's time limit plus the grace: counted
    from its start, or from its creation while it never started (pending, unschedulable); a pod queued in Kueue
    (spec.trial.queueName) only from when it was scheduled, after Kueue admitted it."""
    if not limits.trial_timeout:
        return None
    kind = protocol.unit_kind(unit) or protocol.UnitKind.TRIAL
    limit = protocol.unit_timeout_seconds(kind, limits.trial_timeout)
    since = pod.started if pod.started is not None else pod.created
    if pod.started is None and pod.queue:  # waiting in Kueue's queue is not running late: count from scheduling
        since = pod.scheduled_at
    if since is None or now - since <= limit + limits.grace:
        return None
    if pod.started is None:
        where = f"the scheduler could not place it: {pod.unschedulable}" if pod.unschedulable else "it never started"
        return ("Unschedulable" if pod.unschedulable else "Timeout",
                f"the pod {pod.name} was still pending {now - since:.0f}s after its creation ({where}); the unit's "
                f"time limit is {limit:g}s (spec.tuning.trialTimeoutSeconds)")
    return "Timeout", (f"the pod {pod.name} was still running {now - since:.0f}s after it started; the unit's time "
                       f"limit is {limit:g}s (spec.tuning.trialTimeoutSeconds)")


def queued_status(seen: Observation, reason: str, message: str, now: float,
                  kueue_reasons: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The running job's (reason, message) while units wait for Kueue's admission: the reason is Queued when
    every unit the job runs is waiting (nothing actually runs), and the message says which pod waits in which
    LocalQueue, for how long, and why (Kueue's message: `kueue_reasons`, pod uid -> its Workload's)."""
    if not seen.queued:
        return reason, message
    unit, pod = min(seen.queued.items(), key=lambda item: item[1].created or now)
    waited = now - (pod.created or now)
    more = f" (and {len(seen.queued) - 1} more)" if len(seen.queued) > 1 else ""
    why = (kueue_reasons or {}).get(pod.uid)
    message += (f"; pod {pod.name} ({unit}){more} waits for Kueue's admission in LocalQueue {pod.queue} for "
                f"{waited:.0f}s" + (f": {why}" if why else f" (kubectl get workloads -n {pod.namespace})"))
    return (QUEUED if set(seen.queued) >= seen.running else reason), message
