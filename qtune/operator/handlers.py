"""Kopf handlers: thin; the logic is in reconcile.py (one job's loop step) and its helpers.

* `qtune_pods` (index): the operator's pods by job uid, kept current by Kopf's watch; a pod
  change also wakes its job's loop (so a finished trial is collected at once).
* `tune` (daemon, one per active job): the job's loop: `JobReconciler.step` every
  `poll_interval` seconds or when woken. Kopf stops it when the job reaches a terminal state
  (the `when` filter) and starts it again when the job becomes active (e.g. maxTrials raised).
* `max_trials_changed` (field handler): a job stopped by its trial budget continues when
  spec.tuning.maxTrials is raised.
* `cleanup` (delete handler, with a finalizer): the job's pods and Pushgateway groups go first.

A step's API 4xx answers, an invalid spec and an oversized history end in the job's status (see
reconcile.py); other errors (network, 5xx, bugs) are logged, counted and retried.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import kopf
from kubernetes.client import ApiException

from qtune.operator import constants as c
from qtune.operator import status as st
from qtune.operator.layout import JobRef
from qtune.operator.podstatus import PodSummary, summarize_pod
from qtune.operator.prom import MetricsError
from qtune.operator.reconcile import JobReconciler, Services, resumable_status

JOB = (c.GROUP, c.VERSION, c.PLURAL)
DONE_RECHECK_SECONDS = 30.0


def job_active(status: kopf.Status, meta: kopf.Meta, **_: Any) -> bool:
    """The `when` filter of the job loop: not finished, or failed on its spec (invalid, or the
    baseline failed) and edited since."""
    state = status.get("state")
    if state not in st.TERMINAL:
        return True
    return (status.get("reason") in (st.INVALID_SPEC, st.BASELINE_FAILED, st.API_ERROR, st.HISTORY_TOO_LARGE,
                                        st.OBJECT_CONFLICT)
            and status.get("observedGeneration") != meta.get("generation"))


def _wakeup(memo: kopf.Memo, uid: str) -> asyncio.Event:
    wakeups: dict[str, asyncio.Event] = memo.wakeups
    if uid not in wakeups:
        wakeups[uid] = asyncio.Event()
    return wakeups[uid]


@kopf.index("pods", labels={c.LABEL_MANAGED_BY: c.MANAGED_BY, c.LABEL_JOB_UID: kopf.PRESENT})
async def qtune_pods(body: kopf.Body, memo: kopf.Memo, **_: Any) -> dict[str, PodSummary]:
    """Keyed by the job-uid label; a job's loop keeps only the pods in its namespace that it owns."""
    summary = summarize_pod(body)
    event = memo.wakeups.get(summary.job_uid)
    if event is not None:
        event.set()
    return {summary.job_uid: summary}


def _events(body: kopf.Body):  # noqa: ANN202 - an EventSink
    def post(kind: str, reason: str, message: str) -> None:
        kopf.event(body, type=kind, reason=reason[:128], message=message[:1024])

    return post


@kopf.daemon(*JOB, id="tune", when=job_active, cancellation_backoff=5.0, cancellation_timeout=10.0)
async def tune(stopped: kopf.DaemonStopped, body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger,
               qtune_pods: kopf.Index, **_: Any) -> None:
    services: Services = memo.services
    job = JobRef.from_body(body)
    reconciler = JobReconciler(services, job, _events(body))
    wake = _wakeup(memo, job.uid)
    while not stopped:
        wake.clear()
        try:
            result = await reconciler.step(body, list(qtune_pods.get(job.uid, [])))
            wait = DONE_RECHECK_SECONDS if result.done else result.wait
        except (ApiException, MetricsError, OSError) as exc:
            logger.warning("step failed, retrying: %s", str(exc).splitlines()[0] if str(exc) else repr(exc))
            services.metrics.errors.labels(kind=type(exc).__name__).inc()
            wait = max(services.config.poll_interval, 2.0)
        except Exception as exc:  # noqa: BLE001 - a bug must not end the job's loop for good
            logger.exception("step failed, retrying in 10s")
            services.metrics.errors.labels(kind=type(exc).__name__).inc()
            wait = 10.0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_woken(wake, stopped), timeout=wait)


async def _woken(wake: asyncio.Event, stopped: kopf.DaemonStopped) -> None:
    """Returns when the job's pods changed or the daemon is being stopped."""
    stop_task = asyncio.ensure_future(stopped.wait())
    wake_task = asyncio.ensure_future(wake.wait())
    try:
        await asyncio.wait({stop_task, wake_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (stop_task, wake_task):
            task.cancel()


@kopf.on.field(*JOB, field="spec.tuning.maxTrials", id="max-trials")
async def max_trials_changed(old: Any, new: Any, status: kopf.Status, patch: kopf.Patch, logger: kopf.Logger,
                             **_: Any) -> None:
    if old is None or new is None or not resumable_status(status, int(new)):
        return
    logger.info("maxTrials %s -> %s: the job continues", old, new)
    patch.status["state"] = st.RUNNING
    patch.status["reason"] = st.RESUMED
    patch.status["message"] = f"maxTrials raised from {old} to {new}: tuning continues"


@kopf.on.delete(*JOB, id="cleanup")
async def cleanup(meta: kopf.Meta, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Pods first (they must not push after their groups are deleted), then Pushgateway groups."""
    services: Services = memo.services
    namespace, uid = meta["namespace"], meta["uid"]
    selector = f"{c.LABEL_JOB_UID}={uid}"
    remaining = await services.kube.list_pods(namespace, selector)
    if remaining:
        await services.kube.delete_pods(namespace, selector)
        raise kopf.TemporaryError(f"waiting for {len(remaining)} pod(s) of the job to stop", delay=2)
    if services.pushgateway is not None:
        try:
            count = await services.pushgateway.delete_job_groups(uid)
        except MetricsError as exc:
            raise kopf.TemporaryError(str(exc), delay=5) from exc
        logger.info("deleted %d Pushgateway group(s)", count)
    services.metrics.job_state(uid, None)
    memo.wakeups.pop(uid, None)


@kopf.on.probe(id="jobs")
def jobs_probe(memo: kopf.Memo, **_: Any) -> int:
    """Shown on the health endpoint: how many jobs this operator tracks."""
    return len(memo.wakeups)
