"""`qtune status` and `qtune report` for local runs: read the workspace's history."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from qtune.cli.front_table import front_table
from qtune.local.driver import HISTORY_FILE, default_workspace
from qtune.spec import QtuneError, QuantizationJob, load_job
from qtune.tuning.criterion import Criterion
from qtune.tuning.front import accuracy_speed_front
from qtune.tuning.history import History
from qtune.tuning.objective import select_best, speed_of
from qtune.tuning.session import TuningSession, objective_batch_size


def _load(job_file: str) -> tuple[QuantizationJob, History, Path]:
    job = load_job(job_file)
    workspace = default_workspace(job, Path(job_file))
    path = workspace / HISTORY_FILE
    if not path.exists():
        raise QtuneError(f"no run of job {job.name!r} found in {workspace}; start one with `qtune tune {job_file}`")
    return job, History.load(path), workspace


def print_status(job_file: str) -> int:
    job, history, workspace = _load(job_file)
    console = Console()
    batch = str(objective_batch_size(job.spec))
    table = Table(title=f"{history.job}: {len(history.finished())}/{len(history.trials)} trials finished, "
                  f"stopped: {history.stop_reason or 'not yet'}")
    for column in ("trial", "status", "accuracy", "passes", f"fp32 p50 b{batch} ms", f"int8 p50 b{batch} ms",
                   "speedup [95% interval]", "fp32 ops", "reason"):
        table.add_column(column)
    for t in history.trials:
        measured = speed_of(history, t, batch)
        table.add_row(str(t.index), t.status, t.accuracy_text(),
                      "yes" if t.passed else "no", "–" if measured is None else f"{measured.fp32_p50_ms:.3f}",
                      "–" if measured is None else f"{measured.p50_ms:.3f}",
                      "–" if measured is None else f"{measured.speedup:.2f}× [{measured.low:.2f}–{measured.high:.2f}]",
                      str(len(t.tune_config.fp32_ops())), t.reason or "")
    if history.baseline:
        console.print(f"baseline {history.baseline.metric or 'accuracy'} {history.baseline.accuracy:.4f}, "
                      f"fp32 latency alone {history.baseline.latency_ms} ms")
    console.print(table)
    if history.baseline is not None:
        criterion = job.spec.tuning.accuracy_criterion
        best = select_best(history, job.spec.tuning.objective, job.spec.tuning.objective_tolerance, batch,
                           Criterion.from_spec(criterion))
        front = accuracy_speed_front(history, batch, criterion.higher_is_better, best.index if best else None)
        if front:
            console.print(front_table(front, batch))
    return 0


def regenerate_report(job_file: str, output: Path | None) -> int:
    from qtune.report import write_report
    from qtune.runner.context import JobContext

    job, history, workspace = _load(job_file)
    context = JobContext(job, Path(job_file).resolve().parent, workspace)
    if history.baseline is None:
        raise QtuneError("the run has no baseline yet")
    session = TuningSession(job.spec, history, context.load_space())
    if history.stop_reason is not None:
        console = Console()
        console.print(session.verdict())
    folder = output or workspace
    folder.mkdir(parents=True, exist_ok=True)
    write_report(folder, job, session)
    Console().print(f"report written to {folder / 'report.html'}")
    return 0
