"""Terminal progress for `qtune tune`: trial n of max, best so far, elapsed, ETA."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from qtune.protocol import SpeedMeasurement
from qtune.tuning.history import Baseline, TrialRecord
from qtune.tuning.session import TuningSession
from qtune.tuning.space import TuningSpace


class RichProgress:
    """A ProgressListener drawing one bar; each finished trial also prints one line."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[best]}"), TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
            console=console, transient=False,
        )
        self.task = self.progress.add_task("baseline", total=None, best="", eta="–")
        self.finished = 0
        self.started = time.monotonic()
        self.baseline: Baseline | None = None

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.progress.stop()

    def baseline_ready(self, baseline: Baseline, space: TuningSpace, max_trials: int) -> None:
        self.baseline = baseline
        latency = ", ".join(f"batch {b}: {v:.3f} ms" for b, v in baseline.latency_ms.items())
        self.console.print(f"fp32 baseline: {baseline.metric or 'accuracy'} {baseline.accuracy:.4f}, "
                           f"latency p50 alone {latency}; {len(space.ops)} quantizable ops")
        for name, note in list(space.notes.items())[:10]:
            self.console.print(f"  [yellow]note[/yellow] {name}: {note}")
        self.progress.update(self.task, description="trials", total=max_trials, best="best: –")
        self.started = time.monotonic()

    def confirm_started(self, candidates: list[int]) -> None:
        self.progress.update(self.task, description="confirming")
        self.console.print(f"re-measuring the best candidates (trials {', '.join(map(str, candidates))}) against "
                           "fp32 in one interleaved session")

    def confirm_finished(self, session: TuningSession) -> None:
        self.progress.update(self.task, description="done", eta="0s")
        confirmation = session.history.confirmation or {}
        if confirmation.get("status") != "succeeded":
            self.console.print(f"[yellow]confirmation failed[/yellow] ({confirmation.get('reason')}): the in-trial "
                               "figures decide")
            return
        for index, by_batch in sorted(confirmation.get("speed", {}).items(), key=lambda kv: int(kv[0])):
            data = by_batch.get(str(session.batch_size))
            if data:
                self.console.print(f"  trial {index}: {SpeedMeasurement.model_validate(data).describe()}")

    def trial_started(self, record: TrialRecord) -> None:
        self.progress.update(self.task, description=f"running trial {record.index}")

    def trial_finished(self, record: TrialRecord, best: TrialRecord | None, elapsed: float) -> None:
        self.finished += 1
        mark = "[green]✓[/green]" if record.passed else ("[red]✗[/red]" if record.ok else "[red]failed[/red]")
        detail = (f"accuracy {record.accuracy:.4f}" if record.accuracy is not None
                  else f"{record.reason}: {(record.message or '')[:120]}")
        measured = record.speed_at()
        if measured is not None:
            detail += f", {measured.speedup:.2f}× [{measured.low:.2f}–{measured.high:.2f}] vs fp32 at batch " \
                      f"{measured.batch_size}"
        self.console.print(f"trial {record.index}: {mark} {detail}, {len(record.config.fp32_ops())} fp32 ops, "
                           f"{(record.timings or {}).get('total', 0):.1f}s")
        per_trial = (time.monotonic() - self.started) / self.finished
        remaining = (self.progress.tasks[0].total or 0) - self.finished
        best_speed = best.speed_at() if best else None
        best_text = (f"best: trial {best.index} acc {best.accuracy:.4f}"
                     + (f" {best_speed.speedup:.2f}×" if best_speed else "")) if best else "best: –"
        self.progress.update(self.task, advance=1, best=best_text, description="trials",
                             eta=f"≤{per_trial * remaining:.0f}s" if remaining > 0 else "0s")
