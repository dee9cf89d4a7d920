"""What the operator keeps of a pod (its pod index) and how a finished pod's end is read."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from qtune import protocol
from qtune.operator import constants as c

CONTAINER = "runner"
NODE_STOPPED = ("Evicted", "Preempting", "NodeLost", "Shutdown", "Terminated")
CONTAINER_LOST = "ContainerStatusUnknown"
"""The kubelet's terminated reason for a container that was running and is gone (its node rebooted, the
runtime lost it): nothing the unit did, so the unit starts again (``lost_container``)."""
KNOWN_REASONS = frozenset({
    "OOMKilled", "Timeout", "Crashed", protocol.INVALID_SPEC, "TrialError", "RunnerError", "DeadlineExceeded",
    *NODE_STOPPED, "MetricsUnavailable", "Abandoned", "Failed", "Unschedulable",
})
"""The failure reasons that may become a metric label or an Event reason (a bounded set)."""
OTHER = "Other"
MESSAGE_LIMIT = 2000
"""A failure message is cut to this many characters."""


def bounded_reason(reason: str | None) -> str:
    """`reason` when it is a known failure reason, else "Other": what reaches metric labels and Event
    reasons never depends on free text a pod wrote (a termination message, a pushed result)."""
    return reason if reason in KNOWN_REASONS else OTHER


def bounded_failure(reason: str | None, message: str) -> tuple[str, str]:
    """(known reason or Other, message cut to MESSAGE_LIMIT); an unknown reason's text is kept, cut, in the
    message."""
    known = bounded_reason(reason)
    if reason and known != reason:
        message = f"{reason[:64]}: {message}" if message else reason[:64]
    return known, message[:MESSAGE_LIMIT]


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class PodSummary:
    name: str
    namespace: str
    job_uid: str
    """The job-uid label (what the watch selects on; not proof of anything)."""
    unit: str
    attempt: int
    phase: str
    uid: str = ""
    owner_uids: tuple[str, ...] = ()
    """uids of the pod's controller/owner references: what ties it to its job."""
    created: float | None = None
    started: float | None = None
    finished: float | None = None
    reason: str | None = None
    """Pod-level reason (DeadlineExceeded, Evicted) or the container's terminated reason."""
    container_reason: str | None = None
    exit_code: int | None = None
    message: str | None = None
    node: str | None = None
    deleting: bool = False
    deleted_at: float | None = None
    """metadata.deletionTimestamp: when the pod's grace period ends (it should be gone by then)."""
    unschedulable: str | None = None
    """The scheduler's message while the pod cannot be placed."""
    memory_limit: str | None = None
    """The runner container's resources.limits.memory (what an OOM kill exceeded)."""
    unschedulable_since: float | None = None
    """When the pod's PodScheduled condition became False."""
    queue: str | None = None
    """The Kueue LocalQueue the pod is queued in (its kueue.x-k8s.io/queue-name label), or None."""
    queued: bool = False
    """Kueue has not admitted the pod yet: it still carries Kueue's scheduling gate (not the scheduler's doing)."""
    scheduled_at: float | None = None
    """When the pod's PodScheduled condition became True (a node was chosen)."""
    kueue_stopped: str | None = None
    """Kueue stopped the pod (preempted or evicted its Workload): "<reason>: <message>" of its TerminationTarget
    condition."""
    inputs_configmap: str | None = None
    """The ConfigMap its inputs volume mounts; None when its inputs travel in the pod (builders.inline_inputs)."""

    @property
    def done(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    @property
    def lost_container(self) -> bool:
        """Failed because its node lost the container (not because the container failed)."""
        return self.phase == "Failed" and self.container_reason == CONTAINER_LOST

    def owned_by(self, namespace: str, job_uid: str) -> bool:
        """The pod is in the job's namespace and the job owns it (the label alone proves nothing)."""
        return self.namespace == namespace and job_uid in self.owner_uids


def summarize_pod(body: Any) -> PodSummary:
    meta, status = body.get("metadata", {}), body.get("status") or {}
    lbl = meta.get("labels") or {}
    terminated: dict[str, Any] = {}
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") == CONTAINER or not terminated:
            terminated = (cs.get("state") or {}).get("terminated") or terminated
    unschedulable = unschedulable_since = scheduled_at = kueue_stopped = None
    queued = any(g.get("name") == c.KUEUE_ADMISSION_GATE for g in (body.get("spec") or {}).get("schedulingGates") or [])
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "True":
            scheduled_at = parse_time(cond.get("lastTransitionTime"))
        if cond.get("type") == c.KUEUE_TERMINATION_TARGET and cond.get("status") == "True":
            kueue_stopped = f"{cond.get('reason') or 'Stopped'}: {cond.get('message') or ''}"[:MESSAGE_LIMIT]
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and not queued:
            unschedulable = cond.get("message") or cond.get("reason")
            unschedulable_since = parse_time(cond.get("lastTransitionTime")) or parse_time(
                meta.get("creationTimestamp"))
    attempt = str(lbl.get(c.LABEL_ATTEMPT, "0"))
    memory_limit = None
    for container in (body.get("spec") or {}).get("containers") or []:
        if container.get("name") == CONTAINER:
            memory_limit = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    return PodSummary(
        name=meta.get("name", ""),
        namespace=meta.get("namespace", ""),
        job_uid=lbl.get(c.LABEL_JOB_UID, ""),
        unit=lbl.get(c.LABEL_UNIT, ""),
        attempt=int(attempt) if attempt.isdigit() else -1,
        phase=status.get("phase") or "Pending",
        uid=meta.get("uid", ""),
        owner_uids=tuple(ref.get("uid", "") for ref in meta.get("ownerReferences") or []),
        created=parse_time(meta.get("creationTimestamp")),
        started=parse_time(status.get("startTime")),
        finished=parse_time(terminated.get("finishedAt")),
        reason=status.get("reason") or terminated.get("reason"),
        container_reason=terminated.get("reason"),
        exit_code=terminated.get("exitCode"),
        message=(terminated.get("message") or status.get("message") or None),
        node=(body.get("spec") or {}).get("nodeName"),
        deleting=bool(meta.get("deletionTimestamp")),
        memory_limit=str(memory_limit) if memory_limit is not None else None,
        deleted_at=parse_time(meta.get("deletionTimestamp")),
        unschedulable=unschedulable,
        unschedulable_since=unschedulable_since,
        queue=lbl.get(c.KUEUE_QUEUE_LABEL),
        queued=queued,
        scheduled_at=scheduled_at,
        kueue_stopped=kueue_stopped,
        inputs_configmap=next((v["configMap"].get("name") for v in (body.get("spec") or {}).get("volumes") or []
                               if v.get("name") == c.INPUTS_VOLUME and isinstance(v.get("configMap"), dict)), None),
    )


def failure_of(pod: PodSummary) -> tuple[str, str]:
    """(reason, message) of a failed pod, for the session and the condition message: the reason is one of
    KNOWN_REASONS or "Other", the message at most MESSAGE_LIMIT characters."""
    return bounded_failure(*_failure_of(pod))


LOG_TAIL_LINES = 5
LOG_TAIL_CHARS = 600
"""What of a log tail (a termination message that is not the runner's `Reason: message`) a failure keeps."""


def log_tail(text: str) -> str:
    """The last lines of `text`, bounded, on one line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()][-LOG_TAIL_LINES:]
    tail = " | ".join(lines)
    return tail if len(tail) <= LOG_TAIL_CHARS else "..." + tail[-LOG_TAIL_CHARS:]


def _labelled(message: str) -> str:
    """A termination message as the runner wrote it (`Reason: message`), or labelled as log output: with
    terminationMessagePolicy FallbackToLogsOnError a process that wrote none leaves its log tail there."""
    reason, _ = protocol.parse_termination(message)
    return message if reason is not None else f"log output (last lines): {log_tail(message)}"


def _oom_message(pod: PodSummary, message: str) -> str:
    limit = f"its memory limit of {pod.memory_limit}" if pod.memory_limit else "its memory limit"
    code = f", exit code {pod.exit_code}" if pod.exit_code is not None else ""
    text = (f"{pod.unit or 'the unit'} (pod {pod.name}) was killed (OOMKilled{code}) for exceeding {limit} "
            "(spec.trial.resources.memory)")
    return f"{text}; {_labelled(message)}" if message else text


def _failure_of(pod: PodSummary) -> tuple[str, str]:
    message = (pod.message or "").strip()
    if pod.container_reason == "OOMKilled" or pod.reason == "OOMKilled":
        return "OOMKilled", _oom_message(pod, message)
    if pod.reason == "DeadlineExceeded":
        return "Timeout", message or "the unit exceeded spec.tuning.trialTimeoutSeconds"
    if pod.reason in NODE_STOPPED:
        return pod.reason or "Evicted", message or f"the pod was stopped by the node ({pod.reason})"
    reason, text = protocol.parse_termination(message)
    if pod.exit_code == protocol.EXIT_TRIAL_FAILED:
        return reason or "TrialError", (text if reason else _labelled(text))[:2000]
    if pod.exit_code == protocol.EXIT_JOB_UNUSABLE:
        if reason is None and text.startswith("spec."):
            return protocol.INVALID_SPEC, text[:2000]  # a SpecError names its field first
        return reason or "RunnerError", (text if reason else _labelled(text))[:2000]
    detail = f"exit code {pod.exit_code}" if pod.exit_code is not None else (pod.reason or "failed")
    return "Crashed", f"{detail}; {_labelled(message)}"[:2000] if message else detail
