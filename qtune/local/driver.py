"""`qtune tune`: drive a whole job on this machine with the local executor.

The workspace (default `<job dir>/.qtune/<job name>`) holds the state of a run: the space, the
baseline, caches, one folder per trial, and `history.json` (saved after every change), so an
interrupted run resumes with `--resume` without repeating a finished trial. The output folder
is written only at the end, through a temporary folder, so it is never half-written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from qtune.local.executor import LocalExecutor, cpu_slots
from qtune.spec.errors import QtuneError
from qtune.spec.load import resolve_path
from qtune.spec.models import QuantizationJob
from qtune.tuning import stop
from qtune.tuning.history import Baseline, History, TrialRecord, write_json_atomic
from qtune.tuning.session import TuningSession
from qtune.tuning.space import TuningSpace

logger = logging.getLogger(__name__)

HISTORY_FILE = "history.json"
JOB_FINGERPRINT_FILE = "job-fingerprint.json"


class ProgressListener(Protocol):
    def baseline_ready(self, baseline: Baseline, space: TuningSpace, max_trials: int) -> None: ...
    def trial_started(self, record: TrialRecord) -> None: ...
    def trial_finished(self, record: TrialRecord, best: TrialRecord | None, elapsed: float) -> None: ...


@dataclass
class TuneOutcome:
    job: str
    stop_reason: str
    outcome: str
    baseline: Baseline
    space: TuningSpace
    history: History
    best: TrialRecord | None
    output_dir: Path
    workspace: Path
    elapsed_seconds: float


def default_workspace(job: QuantizationJob, job_file: Path) -> Path:
    if job.spec.workspace.path:
        return resolve_path(job_file, job.spec.workspace.path)
    return job_file.resolve().parent / ".qtune" / job.name


def default_output(job: QuantizationJob, job_file: Path) -> Path:
    if job.spec.output.path:
        return resolve_path(job_file, job.spec.output.path)
    return Path.cwd() / "qtune-output" / job.name


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _fingerprint(job: QuantizationJob, job_file: Path) -> dict[str, str]:
    """What a resumed run must share with the interrupted one: the spec's model, data, quantization and
    tuning sections, and the content of the model and data files they name."""
    spec = job.spec.model_dump(mode="json")
    parts = {key: spec[key] for key in ("model", "data", "quantization", "benchmark")}
    parts["tuning"] = {k: v for k, v in spec["tuning"].items()
                       if k not in ("max_trials", "timeout_seconds", "parallel_trials", "max_failed_trials")}
    result = {key: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
              for key, value in parts.items()}
    files = {"model.path": job.spec.model.path, "model.weights": job.spec.model.weights,
             "data.calibration.path": job.spec.data.calibration.path,
             "data.evaluation.path": job.spec.data.evaluation.path}
    for field, value in files.items():
        path = resolve_path(job_file, value) if value else None
        if path is not None and path.is_file():
            result[field] = _file_digest(path)
    return result


def _check_resumable(workspace: Path, now: dict[str, str]) -> None:
    stored = workspace / JOB_FINGERPRINT_FILE
    if not stored.exists():
        return
    before = json.loads(stored.read_text())
    changed = sorted(k for k in now if before.get(k) != now[k])
    if changed:
        raise QtuneError(
            f"spec.{changed[0]} (or the file it names) changed since the run in {workspace} started; "
            "run with --fresh to start over (resuming would mix results of different jobs)"
        )


class _Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM, raised at a safe point of the loop (never in the middle of a fork)."""


@contextmanager
def _deferred_signals() -> Iterator[list[int]]:
    """Record SIGINT/SIGTERM instead of raising wherever they land; the loop checks the list."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda number, frame: received.append(number))
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _pinned(cpus: list[int]) -> Iterator[None]:
    """Run the baseline benchmark on the same CPUs (and so thread count) a trial gets."""
    try:
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, cpus)
    except (AttributeError, OSError):
        yield
        return
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _prepare(job: QuantizationJob, job_file: Path, workspace: Path, threads: int,
             cpus: list[int]) -> tuple[TuningSpace, Baseline]:
    from qtune.runner.baseline import run_baseline
    from qtune.runner.context import JobContext

    context = JobContext(job, job_file.resolve().parent, workspace, threads)
    with _pinned(cpus):
        return run_baseline(context)


def _publish(outcome_dir: Path, history: History, best: TrialRecord | None, session: TuningSession,
             job: QuantizationJob, stop_reason: str) -> None:
    """Write the output folder atomically: build it beside the target, then swap it in."""
    from qtune.report import write_report

    outcome_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{outcome_dir.name}.", dir=outcome_dir.parent))
    try:
        history.save(staging / HISTORY_FILE)
        if best is not None:
            source = Path(best.model_path) if best.model_path else None
            if source is not None and source.exists():
                if source.is_dir():
                    shutil.copytree(source, staging / "model")
                else:
                    (staging / "model").mkdir()
                    for sibling in source.parent.iterdir():  # keeps external-data files beside the model
                        if sibling.name.startswith(source.stem):
                            shutil.copy2(sibling, staging / "model" / sibling.name)
            write_json_atomic(staging / "best_config.json", {
                "job": job.name, "trial": best.index, "accuracy": best.accuracy,
                "baseline_accuracy": session.baseline.accuracy, "latency_ms": best.latency_ms,
                "baseline_latency_ms": session.baseline.latency_ms, "model_size_bytes": best.model_size_bytes,
                "tune_config": best.tune_config,
            })
        write_report(staging, job, session, history, best, stop_reason)
        old = None
        if outcome_dir.exists():
            old = outcome_dir.with_name(f".{outcome_dir.name}.old-{os.getpid()}")
            outcome_dir.rename(old)
        staging.rename(outcome_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def tune(job: QuantizationJob, job_file: str | Path, *, output_dir: Path | None = None, resume: bool = False,
         fresh: bool = False, listener: ProgressListener | None = None,
         workspace: Path | None = None) -> TuneOutcome:
    """Tune a job on this machine. Raises QtuneError (one line) on bad input, before writing output."""
    job_file = Path(job_file).resolve()
    spec = job.spec
    workspace = (workspace or default_workspace(job, job_file)).resolve()
    output_dir = (output_dir or default_output(job, job_file)).resolve()
    history_path = workspace / HISTORY_FILE

    if history_path.exists() and not resume and not fresh:
        previous = History.load(history_path)
        if not (previous.stop_reason and not previous.pending()):
            raise QtuneError(
                f"an unfinished run of job {job.name!r} exists in {workspace}; "
                "use --resume to continue it or --fresh to start over"
            )
        logger.warning("starting over: the finished run in %s is replaced (its results are in the output "
                       "folder; --resume continues a finished run instead, e.g. with a larger maxTrials)", workspace)
        fresh = True
    if fresh and workspace.exists():
        shutil.rmtree(workspace)
    fingerprint = _fingerprint(job, job_file)  # hashes the model and data files: once per run
    if resume:
        _check_resumable(workspace, fingerprint)

    created = workspace  # the top-most folder this run creates, removed again if preparing fails
    while not created.parent.exists():
        created = created.parent
    created_new = not workspace.exists()
    run_started = time.monotonic()  # the wall-clock limit counts the baseline step too
    slots = cpu_slots(spec.tuning.parallel_trials)
    threads = spec.benchmark.threads or len(slots[0])
    try:
        workspace.mkdir(parents=True, exist_ok=True)
        space, baseline = _prepare(job, job_file, workspace, threads, slots[0])
    except BaseException:
        if created_new:
            shutil.rmtree(created, ignore_errors=True)
        raise
    write_json_atomic(workspace / JOB_FINGERPRINT_FILE, fingerprint)

    history = History.load(history_path) if history_path.exists() else History(job=job.name)
    history.baseline = baseline
    history.stop_reason = None
    session = TuningSession(spec, space, baseline, history)
    if listener:
        listener.baseline_ready(baseline, space, spec.tuning.max_trials)

    executor = LocalExecutor(job_file, job_file.parent, workspace, spec.tuning.parallel_trials,
                             float(spec.tuning.trial_timeout_seconds), spec.benchmark.threads)
    base_elapsed = history.elapsed_seconds

    def save() -> None:
        history.elapsed_seconds = base_elapsed + (time.monotonic() - run_started)
        history.save(history_path)

    stop_reason: str | None = None
    with _deferred_signals() as received:
        try:
            stop_reason = _loop(session, executor, listener, received, base_elapsed, run_started, save)
        except BaseException:
            executor.stop_all()  # interrupted: killed trials stay pending and run again on --resume
            save()
            raise
    elapsed = base_elapsed + (time.monotonic() - run_started)
    history.stop_reason = stop_reason
    save()
    best = session.best()
    _publish(output_dir, history, best, session, job, stop_reason)
    return TuneOutcome(job.name, stop_reason, session.outcome(stop_reason), baseline, space, history, best,
                       output_dir, workspace, elapsed)


def _loop(session: TuningSession, executor: LocalExecutor, listener: ProgressListener | None, received: list[int],
          base_elapsed: float, run_started: float, save: Callable[[], None]) -> str:
    """Keep trials running until a stop rule holds; returns the stop reason."""
    history = session.history

    def launch(record: TrialRecord) -> None:
        executor.start(record.index, record.tune_config)
        if listener:
            listener.trial_started(record)

    # trials an interrupted run left pending start again first, with their own index
    queue = list(history.pending())
    while True:
        if received:
            raise _Interrupted()
        elapsed = base_elapsed + (time.monotonic() - run_started)
        stop_reason = session.hard_stop(elapsed)
        if stop_reason:
            message = ("stopped: the tuning ran out of its wall-clock limit" if stop_reason == stop.TIMEOUT
                       else f"stopped: {stop_reason}")
            for index in executor.stop_all():
                session.fail(index, stop_reason, message)
            return stop_reason
        while queue and executor.free_slots() > 0:
            launch(queue.pop(0))
        if not queue and executor.free_slots() > 0:
            for record in session.start_trials(executor.free_slots()):
                launch(record)
            save()
        if not executor.running:
            # nothing running and nothing new proposed: the search is over
            return session.finished_reason() or stop.SEARCH_EXHAUSTED
        for index, result in executor.poll(wait=0.5):
            record = session.record_result(index, result)
            save()
            if listener:
                listener.trial_finished(record, session.best(), base_elapsed + (time.monotonic() - run_started))
