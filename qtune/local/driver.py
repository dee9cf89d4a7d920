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
from typing import Any, Protocol

from qtune.local.executor import LocalExecutor
from qtune.protocol import SpeedMeasurement, UnitKind
from qtune.runner.cleanup import KEEP_BEST, remove_trial_models
from qtune.spec.entrypoints import add_job_dir
from qtune.spec.errors import QtuneError
from qtune.spec.load import resolve_path
from qtune.spec.models import JobSpec, QuantizationJob
from qtune.tuning import codec, stop
from qtune.tuning.best import best_summary
from qtune.tuning.engine import drive
from qtune.tuning.front import front_document, session_front
from qtune.tuning.history import Baseline, History, TrialRecord, write_json_atomic
from qtune.tuning.resume import history_resume_message
from qtune.tuning.session import TuningSession, WorkUnit
from qtune.tuning.space import TuningSpace

logger = logging.getLogger(__name__)

HISTORY_FILE = "history.json"
JOB_FINGERPRINT_FILE = "job-fingerprint.json"
SPACE_FILE = "space.json"


class ProgressListener(Protocol):
    def baseline_ready(self, baseline: Baseline, space: TuningSpace, max_trials: int) -> None: ...
    def trial_started(self, record: TrialRecord) -> None: ...
    def trial_finished(self, record: TrialRecord, best: TrialRecord | None, elapsed: float) -> None: ...
    def confirm_started(self, candidates: list[int]) -> None: ...
    def confirm_finished(self, session: TuningSession) -> None: ...


@dataclass
class TuneOutcome:
    job: str
    stop_reason: str
    outcome: str
    session: TuningSession
    output_dir: Path
    workspace: Path
    elapsed_seconds: float

    @property
    def history(self) -> History:
        return self.session.history

    @property
    def baseline(self) -> Baseline:
        assert self.session.baseline is not None
        return self.session.baseline

    @property
    def space(self) -> TuningSpace:
        assert self.session.space is not None
        return self.session.space

    @property
    def best(self) -> TrialRecord | None:
        return self.session.best()

    @property
    def speed(self) -> SpeedMeasurement | None:
        return self.session.best_speed()


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


@contextmanager
def _deferred_signals() -> Iterator[list[int]]:
    """Record SIGINT/SIGTERM/SIGHUP instead of raising wherever they land; the loop checks the list."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for sig in previous:
        signal.signal(sig, lambda number, frame: received.append(number))
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)




# --- folders qtune owns ------------------------------------------------------------------------
WORKSPACE_MARKER = ".qtune-workspace"
OUTPUT_MARKER = ".qtune-output"


def _check_own_folder(path: Path, marker: str, field: str) -> None:
    """Refuse to use (and later delete or replace) a folder qtune did not create."""
    if path == Path.cwd().resolve() or path in Path.cwd().resolve().parents or path == Path(path.anchor):
        raise QtuneError(f"{field}: {path} is the current folder or one of its parents; qtune replaces its "
                         "workspace and output folders, so give each its own folder")
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / marker).exists())):
        raise QtuneError(f"{field}: {path} exists and was not created by qtune; choose a new or empty folder")


def _make_own_folder(path: Path, marker: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / marker).touch()


def _publish(outcome_dir: Path, session: TuningSession, job: QuantizationJob) -> None:
    """Write the output folder atomically: build it beside the target, then swap it in."""
    from qtune.report import write_report

    history = session.history
    best = session.best()
    outcome_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{outcome_dir.name}.", dir=outcome_dir.parent))
    try:
        (staging / OUTPUT_MARKER).touch()
        # the record plus the accuracy-speed front it implies (History.load ignores "front": derived, not state)
        write_json_atomic(staging / HISTORY_FILE,
                          {**codec.dump(history), "front": front_document(session_front(session), session.batch_size)})
        if best is not None:
            source = Path(best.model_path) if best.model_path else None
            if source is not None and source.exists():
                _copy_model(source, staging / "model")
            write_json_atomic(staging / "best_config.json", best_config(job, session))
        write_report(staging, job, session)
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


def _clean_trial_models(job: QuantizationJob, session: TuningSession, workspace: Path) -> None:
    """spec.workspace.trialModels keep-best (the default here): once the output is written, the models of all
    trials but the winner and the other configs on the accuracy-speed front leave the workspace (the operator
    does the same in a short pod)."""
    if (job.spec.workspace.trial_models or KEEP_BEST) != KEEP_BEST:
        return
    remove_trial_models(workspace, models_to_keep(session))


def models_to_keep(session: TuningSession) -> list[int]:
    """keep-best keeps these trials' models: the winner's and the front's (a user may pick another front config
    without running it again)."""
    best = session.best()
    keep = {entry.trial for entry in session_front(session)} if session.ready else set()
    if best is not None:
        keep.add(best.index)
    return sorted(keep)


MODEL_FOLDER = "model"
"""The folder a trial saves its model into (`save_model(model, <trial>/model)`): all of it is the model's."""
MODEL_SIDECARS = ("qtune_model.json",)
"""Files an adaptor writes beside its model that do not share the model's name (the PyTorch adaptor's
metadata: inputs, tune config, int8 and fp32 ops)."""


def _copy_model(source: Path, target: Path) -> None:
    """Copy a saved model into `target`: a model folder whole; a model file with what the adaptor wrote
    beside it (external-data files named after the model, `qtune_model.json`), or the whole trial
    `model/` folder it was saved into. Hidden files (temporary copies) stay behind."""
    if source.is_dir():
        shutil.copytree(source, target)
        return
    target.mkdir()
    dedicated = source.parent.name == MODEL_FOLDER
    for sibling in source.parent.iterdir():
        if sibling.name.startswith(".") or not sibling.is_file():
            continue
        if dedicated or sibling.name.startswith(source.stem) or sibling.name in MODEL_SIDECARS:
            shutil.copy2(sibling, target / sibling.name)


def best_config(job: QuantizationJob, session: TuningSession) -> dict[str, Any]:
    """best_config.json: the session's BestSummary (the same the console, report and the operator's status.best
    show), with the file's own field names."""
    best = best_summary(session)
    assert best is not None and session.baseline is not None
    return {
        "job": job.name,
        "outcome": best.outcome,
        "verdict": best.verdict,
        "trial": best.trial,
        "accuracy": best.accuracy,
        "baseline_accuracy": best.baseline_accuracy,
        "metric": best.metric,
        "speed": codec.dump(best.speed) if best.speed is not None else None,
        "speed_source": best.speed_source,
        "fp32_alone_latency_ms": best.fp32_alone_latency_ms,
        "model_size_bytes": best.model_size_bytes,
        "baseline_model_size_bytes": best.baseline_model_size_bytes,
        "fp32_ops": best.fp32_ops,
        "tune_config": codec.dump(best.tune_config),
    }


def load_space(workspace: Path) -> TuningSpace | None:
    path = workspace / SPACE_FILE
    return codec.load(TuningSpace, json.loads(path.read_text())) if path.exists() else None


class _UnitListener:
    """Adapts the engine's unit events to the CLI's ProgressListener."""

    def __init__(self, listener: ProgressListener | None, session: TuningSession, elapsed: Callable[[], float]):
        self.listener = listener
        self.session = session
        self.elapsed = elapsed

    def unit_started(self, unit: WorkUnit) -> None:
        if self.listener is None:
            return
        if unit.kind == UnitKind.TRIAL:
            record = next(t for t in self.session.history.trials if t.index == unit.trial)
            self.listener.trial_started(record)
        elif unit.kind == UnitKind.CONFIRM:
            self.listener.confirm_started(list(unit.candidates))

    def unit_finished(self, unit_id: str, record: TrialRecord | None, session: TuningSession) -> None:
        if self.listener is None:
            return
        if unit_id == UnitKind.BASELINE and session.ready:
            assert session.baseline is not None and session.space is not None
            self.listener.baseline_ready(session.baseline, session.space, session.spec.tuning.max_trials)
        elif record is not None:
            self.listener.trial_finished(record, session.best(), self.elapsed())
        elif unit_id == UnitKind.CONFIRM:
            self.listener.confirm_finished(session)


def _continue_finished(history: History, spec: JobSpec, workspace: Path, now: float) -> None:
    """--resume of a finished run: it goes on when the resume rule says a budget was raised above what the run
    used (qtune.tuning.resume); otherwise it stays finished and is reported again."""
    message = history_resume_message(history, spec, now)
    if message is None:
        logger.warning("the run in %s finished (%s) and no budget it stopped on was raised: nothing to continue",
                       workspace, history.stop_reason)
        return
    logger.info("resuming the run in %s, stopped %s: %s", workspace, history.stop_reason, message)
    history.stop_reason = history.outcome = None


def _resolve_folders(job: QuantizationJob, job_file: Path, workspace: Path | None,
                     output_dir: Path | None) -> tuple[Path, Path]:
    """The run's workspace and output folders: qtune's own (or new), and neither inside the other."""
    workspace = (workspace or default_workspace(job, job_file)).resolve()
    output_dir = (output_dir or default_output(job, job_file)).resolve()
    _check_own_folder(workspace, WORKSPACE_MARKER, "spec.workspace.path")
    _check_own_folder(output_dir, OUTPUT_MARKER, "spec.output.path (or -o)")
    if workspace == output_dir or output_dir in workspace.parents or workspace in output_dir.parents:
        raise QtuneError(f"spec.output.path: {output_dir} and the workspace {workspace} must not contain each other")
    return workspace, output_dir


def _prepare_workspace(job: QuantizationJob, job_file: Path, workspace: Path, *, resume: bool,
                       fresh: bool) -> tuple[Path, bool]:
    """Start over, resume or refuse an earlier run in `workspace`, then make it with this run's fingerprint.
    Returns the top-most folder this run creates and whether the workspace is new (both removed again if
    the baseline fails)."""
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
        shutil.rmtree(workspace)  # ours: _check_own_folder found the marker (or the folder is empty)
    fingerprint = _fingerprint(job, job_file)  # hashes the model and data files: once per run
    if resume:
        _check_resumable(workspace, fingerprint)

    created = workspace  # the top-most folder this run creates, removed again if the baseline fails
    while not created.parent.exists():
        created = created.parent
    created_new = not workspace.exists()
    _make_own_folder(workspace, WORKSPACE_MARKER)
    write_json_atomic(workspace / JOB_FINGERPRINT_FILE, fingerprint)
    return created, created_new


def _load_history(job: QuantizationJob, workspace: Path, clock: Callable[[], float]) -> History:
    """The history this run goes on from: the workspace's (a failed baseline's is dropped), or a new one."""
    history_path = workspace / HISTORY_FILE
    history = History.load(history_path) if history_path.exists() else History(job=job.name)
    # A local job's clock runs only while `qtune tune` does: the stretch an earlier run left open (from its last
    # save until it died) is not counted; the session starts the clock again.
    history.started_at = None
    if history.stop_reason == stop.BASELINE_FAILED:
        history = History(job=job.name)
    elif history.stop_reason is not None:
        _continue_finished(history, job.spec, workspace, clock())
    return history


def tune(job: QuantizationJob, job_file: str | Path, *, output_dir: Path | None = None, resume: bool = False,
         fresh: bool = False, listener: ProgressListener | None = None,
         workspace: Path | None = None, clock: Callable[[], float] = time.time) -> TuneOutcome:
    """Tune a job on this machine. Raises QtuneError (one line) on bad input, before writing output.
    `clock` is the session's (the job's elapsed time, the trials' timestamps)."""
    job_file = Path(job_file).resolve()
    spec = job.spec
    workspace, output_dir = _resolve_folders(job, job_file, workspace, output_dir)
    created, created_new = _prepare_workspace(job, job_file, workspace, resume=resume, fresh=fresh)
    history_path = workspace / HISTORY_FILE
    history = _load_history(job, workspace, clock)
    space = load_space(workspace) if history.baseline is not None else None
    add_job_dir(job_file.parent)  # the session imports a `module:Class` strategy from the job's folder
    session = TuningSession(spec, history, space, clock=clock)
    executor = LocalExecutor(job_file, job_file.parent, workspace, spec.tuning.parallel_trials,
                             float(spec.tuning.trial_timeout_seconds), spec.benchmark.threads)
    elapsed = session.elapsed

    def save() -> None:
        history.checkpoint(clock())  # history.json's elapsed_seconds is the tuning time as of this save
        history.save(history_path)

    if listener is not None and session.ready:
        assert history.baseline is not None and space is not None
        listener.baseline_ready(history.baseline, space, spec.tuning.max_trials)
    with _deferred_signals() as received:
        try:
            stop_reason = drive(session, executor, save, _UnitListener(listener, session, elapsed),
                                interrupted=lambda: bool(received))
        except BaseException:
            executor.stop_all()  # interrupted: killed trials stay pending and run again on --resume
            save()
            raise
    if stop_reason == stop.BASELINE_FAILED or history.baseline is None:
        if created_new:
            shutil.rmtree(created, ignore_errors=True)
        raise QtuneError(history.message or "the fp32 baseline failed")
    save()
    _publish(output_dir, session, job)
    _clean_trial_models(job, session, workspace)
    return TuneOutcome(job.name, stop_reason, session.outcome(), session, output_dir, workspace, elapsed())
