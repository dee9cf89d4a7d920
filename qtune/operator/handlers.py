"""Kopf handlers: thin; the logic is in reconcile.py (one job's loop step) and its helpers.

* `qtune_pods` (index): the operator's pods by job uid, kept current by Kopf's watch; a pod
  change also wakes its job's loop (so a finished trial is collected at once).
* `kueue_stopped_pod` (event handler): a unit pod Kueue stopped (its TerminationTarget condition), kept in
  `memo.kueue_stopped` for its job's loop to name (an Event, the status): Kueue deletes such a pod at once,
  and the index never holds a deleted pod, so the loop's own step may never see it.
* `tune` (daemon, one per active job): the job's loop: `JobReconciler.step` every
  `poll_interval` seconds or when woken. Kopf stops it when the job reaches a terminal state
  (the `when` filter) and starts it again when the job becomes active (e.g. maxTrials raised).
* `budget_changed` (field handlers of spec.tuning.maxTrials, timeoutSeconds, maxFailedTrials): a job
  stopped by a budget continues when the resume rule (qtune/tuning/resume.py) says the edit raised it.
* `job_deleted` (event handler, no finalizer): jobs carry no finalizer, so deleting a job (or the CRD
  once the operator is gone) never waits for the operator or the Pushgateway. Pods, ConfigMaps and
  Secrets go by their ownerReferences (the garbage collector); this handler stops the job's loop,
  deletes the pods the job owns at once (ownerReferences uid, never by label alone) and tries once to
  delete its Pushgateway groups; what is left is swept later (qtune/operator/sweep.py). With the
  setting cleanup_deleted_job_folders it also starts the pod that deletes the job's folder from its
  workspace claim (qtune/operator/folders.py); `folder_cleanup_pod_changed` deletes that pod once it
  succeeded. Kopf removes the finalizer an older operator put on a job when it next sees it.

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
from qtune.operator import folders
from qtune.operator import status as st
from qtune.operator.layout import JobRef
from qtune.operator.podstatus import PodSummary, summarize_pod
from qtune.operator.prom import MetricsError
from qtune.operator.reconcile import JobReconciler, Services, status_resume_message, validate
from qtune.spec.errors import SpecError

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


def _kueue_stopped(body: kopf.Body, **_: Any) -> bool:
    return any(cond.get("type") == c.KUEUE_TERMINATION_TARGET and cond.get("status") == "True"
               for cond in (body.get("status") or {}).get("conditions") or [])


@kopf.on.event("pods", id="kueue-stopped", labels={c.LABEL_MANAGED_BY: c.MANAGED_BY, c.LABEL_JOB_UID: kopf.PRESENT},
               when=_kueue_stopped)
async def kueue_stopped_pod(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Keep the pod (by job-uid label; the job's loop checks ownership) until the job's loop takes it."""
    summary = summarize_pod(body)
    memo.setdefault("kueue_stopped", {}).setdefault(summary.job_uid, {})[summary.name] = summary
    event = memo.wakeups.get(summary.job_uid)
    if event is not None:
        event.set()


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
    deleted: set[str] = memo.deleted
    while not stopped and job.uid not in deleted:
        wake.clear()
        reconciler.kueue_stops.note(memo.setdefault("kueue_stopped", {}).pop(job.uid, {}).values())
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
@kopf.on.field(*JOB, field="spec.tuning.timeoutSeconds", id="timeout")
@kopf.on.field(*JOB, field="spec.tuning.maxFailedTrials", id="max-failed-trials")
async def budget_changed(old: Any, new: Any, body: kopf.Body, status: kopf.Status, patch: kopf.Patch,
                         logger: kopf.Logger, **_: Any) -> None:
    """A budget of a finished job was edited: when the resume rule says it goes on, the job is active again
    (its loop starts, and `JobReconciler._maybe_continue` resumes it from the history)."""
    if old == new or status.get("state") not in st.TERMINAL:
        return
    try:
        spec, _ = validate(body)
    except SpecError:
        return  # the job stays finished; an invalid spec is reported if it ever runs again
    message = status_resume_message(status, spec)
    if message is None:
        return
    logger.info("%s: the job continues", message)
    patch.status["state"] = st.RUNNING
    patch.status["reason"] = st.RESUMED
    patch.status["message"] = message


def _no_finalizer_for(handler_id: str) -> None:
    """Kopf puts a finalizer on every object a daemon runs for (to stop the daemon before the object goes).
    qtune's job loop stops on the job's DELETED event instead (`job_deleted`), so jobs need no finalizer:
    without one, deleting a job or the CRD never hangs on an absent operator."""
    registry = kopf.get_default_registry()
    # private Kopf API: kopf is pinned (pyproject.toml, `operator` extra); tests/operator/test_kopf_pin.py
    # fails when an upgrade changes registry._spawning or the handlers' requires_finalizer
    found = [h for h in registry._spawning.get_all_handlers() if h.id == handler_id]
    if len(found) != 1 or not hasattr(found[0], "requires_finalizer"):
        raise RuntimeError(f"Kopf's daemon handler {handler_id!r} not found: cannot run jobs without a finalizer")
    object.__setattr__(found[0], "requires_finalizer", False)


_no_finalizer_for("tune")


def owned_pods(pods: list[dict[str, Any]], namespace: str, uid: str) -> list[str]:
    """Names of the pods in `pods` that the job (uid) owns by an ownerReference: a label anyone can set on
    any pod is never enough."""
    names = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        if meta.get("namespace", namespace) != namespace:
            continue
        if any(ref.get("uid") == uid for ref in meta.get("ownerReferences") or []):
            names.append(str(meta.get("name")))
    return names


def _is_deletion(type: str, **_: Any) -> bool:  # noqa: A002 - Kopf's argument name
    return type == "DELETED"


@kopf.on.event(*JOB, id="deleted", when=_is_deletion)
async def job_deleted(type: str, body: kopf.Body, meta: kopf.Meta, memo: kopf.Memo,  # noqa: A002
                      logger: kopf.Logger, **_: Any) -> None:
    """The job is gone (no finalizer held it): stop its loop, delete the pods it owns and, once, its
    Pushgateway groups (never retried here: the periodic sweep deletes what is left); then start the pod
    deleting its workspace folder."""
    if type != "DELETED":
        return
    services: Services = memo.services
    namespace, uid = meta["namespace"], meta["uid"]
    memo.deleted.add(uid)
    getattr(memo, "kueue_stopped", {}).pop(uid, None)
    wake = memo.wakeups.pop(uid, None)
    if wake is not None:
        wake.set()
    services.metrics.job_state(uid, None)
    try:
        pods = await services.kube.list_pods(namespace, f"{c.LABEL_JOB_UID}={uid}")
        # Grace 0: a deleted job's units have nothing to save, and a runner (PID 1 of its container)
        # still starting has no SIGTERM handler yet: it would ignore a graceful stop and push its
        # result after the groups below are gone.
        for name in owned_pods(pods, namespace, uid):
            await services.kube.delete_pod(namespace, name, grace_seconds=0)
    except (ApiException, OSError) as exc:
        logger.warning("could not delete the job's pods (the garbage collector will): %s", exc)
    if services.pushgateway is not None:
        try:
            count = await asyncio.wait_for(services.pushgateway.delete_job_groups(uid), timeout=15)
            logger.info("deleted %d Pushgateway group(s)", count)
        except (MetricsError, TimeoutError) as exc:
            logger.warning("Pushgateway groups of the job not deleted yet (the periodic sweep will): %s", exc)
    await _delete_folder(services, body, logger)


async def _delete_folder(services: Services, body: kopf.Body, logger: kopf.Logger) -> None:
    """After the job's own pods: the pod deleting its folder from the workspace claim (folders.py)."""
    pod = folders.deleted_job_cleanup(body, services.config)
    if pod is None:
        return
    try:
        if await services.kube.create_pod(pod):
            logger.info("deleting the job's workspace folder (pod %s)", pod["metadata"]["name"])
    except (ApiException, OSError) as exc:
        logger.warning("could not start the pod deleting the job's workspace folder (it stays): %s", exc)


@kopf.on.event("pods", id="folder-cleanup",
               labels={c.LABEL_MANAGED_BY: c.MANAGED_BY, c.LABEL_ROLE: folders.ROLE_FOLDER_CLEANUP})
async def folder_cleanup_pod_changed(type: str, body: kopf.Body, memo: kopf.Memo,  # noqa: A002
                                     logger: kopf.Logger, **_: Any) -> None:
    """A deleted job's folder cleanup pod (it has no owner to go with) is deleted once it succeeded; a
    failed one stays for `kubectl logs`. Also for the pods of before an operator restart (Kopf lists them)."""
    if type == "DELETED":
        return
    action = folders.after_folder_cleanup(body)
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    if action == "delete":
        try:
            await memo.services.kube.delete_pod(namespace, name)
        except (ApiException, OSError) as exc:
            logger.warning("could not delete the finished folder cleanup pod %s: %s", name, exc)
    elif action == "keep":
        logger.warning("the folder cleanup pod %s failed: the job's folder may remain (kubectl logs -n %s %s)",
                       name, namespace, name)


@kopf.on.probe(id="jobs")
def jobs_probe(memo: kopf.Memo, **_: Any) -> int:
    """Shown on the health endpoint: how many jobs this operator tracks."""
    return len(memo.wakeups)
