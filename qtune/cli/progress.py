"""Terminal progress for `qtune tune`: trial n of max, best so far, elapsed, ETA."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from qtune.protocol import SpeedMeasurement
from qtune.runner.peaks import memory_text
from qtune.tuning.front import speedup_text
from qtune.tuning.history import DECODE_KEY, Baseline, TrialRecord, speed_key_text
from qtune.tuning.objective import confirmed_speed
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
        latency = ", ".join(f"{speed_key_text(b)}: {v:.3f} ms" for b, v in baseline.latency_ms.items())
        self.console.print(f"fp32 baseline: {baseline.metric or 'accuracy'} {baseline.accuracy:.4f}, "
                           f"latency p50 alone {latency}; {len(space.ops)} quantizable ops"
                           f"{memory_text(baseline.peak_rss_bytes)}")
        for name, note in list(space.notes.items())[:10]:
            self.console.print(f"  [yellow]note[/yellow] {name}: {note}")
        self.progress.update(self.task, description="trials", total=max_trials, best="best: –")
        self.started = time.monotonic()

    def confirm_started(self, candidates: list[int]) -> None:
        self.progress.update(self.task, description="confirming")
        self.console.print(f"re-measuring the best candidates (trials {', '.join(map(str, candidates))}) against "
                           "fp32 in one interleaved session")

    def confirm_finished(self, session: TuningSession) -> None:
        best = session.best()
        measured = session.best_speed()
        confirmed = best is not None and confirmed_speed(session.history, best.index, session.batch_size) is not None
        # the bar's "best" now shows the figure the final line prints: one figure for the winner everywhere
        self.progress.update(self.task, description="done", eta="0s", best=best_text(best, measured, confirmed))
        confirmation = session.history.confirmation
        if confirmation is None or confirmation.status != "succeeded":
            reason = confirmation.reason if confirmation is not None else None
            self.console.print(f"[yellow]confirmation failed[/yellow] ({reason}): the in-trial figures decide")
            return
        for index, by_batch in sorted(confirmation.speed.items(), key=lambda kv: int(kv[0])):
            measured = by_batch.get(str(session.batch_size))
            if measured is not None:
                self.console.print(f"  trial {index}: {measured.describe()}")

    def trial_started(self, record: TrialRecord) -> None:
        self.progress.update(self.task, description=f"running trial {record.index}")

    def trial_finished(self, record: TrialRecord, best: TrialRecord | None, elapsed: float) -> None:
        self.finished += 1
        mark = "[green]✓[/green]" if record.passed else ("[red]✗[/red]" if record.ok else "[red]failed[/red]")
        detail = (f"accuracy {record.accuracy_text()}" if record.accuracy is not None
                  else f"{record.reason}: {(record.message or '')[:120]}")
        key = record.batch_key()
        measured = record.speed_at(key)
        if measured is not None:
            detail += (f", {speedup_text(measured.speedup, measured.low, measured.high)} vs fp32 at "
                       f"{speed_key_text(str(key))}")
            if key == DECODE_KEY:
                detail += f" ({1000 / measured.fp32_p50_ms:.1f} → {1000 / measured.p50_ms:.1f} tokens/s)"
            if measured.caveat():  # a busy machine: say how the figure was measured, or that it cannot be trusted
                detail += f" [yellow]({measured.caveat()})[/yellow]"
        if weights := record.tune_config.weights_text():  # weight-only: which bits and algorithms the trial tried
            detail += f", weights {weights}"
        self.console.print(f"trial {record.index}: {mark} {detail}, {len(record.tune_config.fp32_ops())} fp32 ops, "
                           f"{(record.timings or {}).get('total', 0):.1f}s{memory_text(record.peak_rss_bytes)}")
        per_trial = (time.monotonic() - self.started) / self.finished
        remaining = (self.progress.tasks[0].total or 0) - self.finished
        self.progress.update(self.task, advance=1, best=best_text(best, best.speed_at() if best else None, False),
                             description="trials", eta=f"≤{per_trial * remaining:.0f}s" if remaining > 0 else "0s")


def best_text(best: TrialRecord | None, measured: SpeedMeasurement | None, confirmed: bool) -> str:
    """The bar's best-so-far: the winner's speedup, saying which figure it is (the trial's own until the final
    confirmation re-measured it; the final line prints the confirmed one)."""
    if best is None:
        return "best: –"
    text = f"best: trial {best.index} acc {best.accuracy:.4f}"
    if measured is not None:
        text += f" {measured.speedup:.2f}× ({'confirmed' if confirmed else 'in-trial'})"
    return text
