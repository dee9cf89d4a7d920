"""Which observed results the operator may believe: a result counts only with proof of origin.

A result read from Prometheus, or from the termination message of U's succeeded pod (preferred: see
qtune/operator/pods.py `_results`), is accepted for unit U of job J only when
  * the pod of U exists in J's namespace, J owns it (ownerReference uid), its name is the one the
    operator gave U's attempt, and it has finished (Succeeded) — not merely labelled with J's uid;
  * its signature verifies with U's secret, derived from the operator's signing key, J's uid, U
    and the pod's attempt (the pod alone received that secret, through its own Secret).
A valid result whose pod is still running waits. A result signed with the secret of an EARLIER attempt of
the same unit is stale (STALE): that pod was deleted or lost after it pushed, and the unit runs again; it is
ignored quietly, as it proves its origin (on a real kubelet a deleted pod's process keeps running until its
SIGTERM arrives, and often finishes first). Anything else is rejected: ignored, counted in
`qtune_operator_results_rejected_total{reason}` and posted once as a Warning Event.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from qtune import protocol
from qtune.operator import constants as c
from qtune.operator.layout import JobRef
from qtune.operator.podstatus import PodSummary

ACCEPT, WAIT, STALE = "accept", "wait", "stale"
NO_POD, BAD_SIGNATURE, WRONG_UNIT = "NoPod", "BadSignature", "WrongUnit"


@dataclass(frozen=True)
class Observed:
    """A result as read from Prometheus, not yet believed."""

    unit: str
    result: protocol.Result
    signature: str | None


def terminated_result(pod: PodSummary) -> Observed | None:
    """The signed result a pod's runner left in its termination message (qtune.runner.metrics.termination_result),
    for the pod's own unit; None when there is none or it does not decode (then the pushed copy is awaited)."""
    try:
        found = protocol.result_of_termination(pod.message)
    except protocol.ProtocolError:
        return None
    if found is None or found[0] != pod.unit:
        return None
    return Observed(pod.unit, found[1], found[2])


def unit_pods(job: JobRef, pods: Iterable[PodSummary]) -> dict[str, PodSummary]:
    """The current pod of each unit (highest attempt): only pods in the job's namespace, owned by
    the job, with the name the operator gives that unit's attempt."""
    out: dict[str, PodSummary] = {}
    for pod in pods:
        if not pod.unit or pod.attempt < 0 or not pod.owned_by(job.namespace, job.uid):
            continue
        if pod.name != c.unit_pod(job.name, pod.unit, pod.attempt):
            continue
        current = out.get(pod.unit)
        if current is None or pod.attempt > current.attempt:
            out[pod.unit] = pod
    return out


def judge(job: JobRef, observed: Observed, pod: PodSummary | None, signing_key: str) -> str:
    """ACCEPT, WAIT (valid, its pod still running), STALE (valid for an earlier attempt of the unit) or the
    reason to reject it."""
    if pod is None or pod.unit != observed.unit:
        return NO_POD
    index = protocol.unit_trial_index(observed.unit)
    if isinstance(observed.result, protocol.TrialResult) != (index is not None) or \
            (index is not None and observed.result.trial != index):  # type: ignore[union-attr]
        return WRONG_UNIT
    if protocol.result_kind(observed.result) != protocol.unit_kind(observed.unit):
        return WRONG_UNIT
    secret = protocol.derive_unit_secret(signing_key, job.uid, observed.unit, pod.attempt)
    if not protocol.verify_result(job.uid, observed.unit, observed.result, secret, observed.signature):
        for attempt in range(pod.attempt):
            earlier = protocol.derive_unit_secret(signing_key, job.uid, observed.unit, attempt)
            if protocol.verify_result(job.uid, observed.unit, observed.result, earlier, observed.signature):
                return STALE
        return BAD_SIGNATURE
    if pod.phase != "Succeeded":
        return WAIT
    return ACCEPT
