"""`qtune tune`'s progress bar: the winner's figure is the one the final line prints (the confirmation's once
it ran) and says which figure it is; a slower trial's line says slower."""

from __future__ import annotations

import io

from rich.console import Console
from simulated import job_spec, run_simulated, simulated_space

from qtune.cli.progress import RichProgress


def _accuracy(config) -> float:  # type: ignore[no-untyped-def]
    return 0.95 - 0.001 * (24 - len(config.fp32_ops()))


def test_the_bar_shows_the_confirmed_figure_after_the_confirmation() -> None:
    session, _, _ = run_simulated(job_spec(maxTrials=8), simulated_space(), _accuracy)
    best = session.best()
    final = session.best_speed()
    in_trial = best.speed_at(session.batch_size) if best else None
    assert best is not None and final is not None and in_trial is not None
    assert final != in_trial  # two measurements of the winner: the trial's and the confirmation's
    out = io.StringIO()
    with RichProgress(Console(file=out, width=200)) as progress:
        progress.trial_finished(best, best, 1.0)
        assert progress.progress.tasks[0].fields["best"].endswith(f"{in_trial.speedup:.2f}× (in-trial)")
        progress.confirm_finished(session)
        shown = progress.progress.tasks[0].fields["best"]
    assert shown == f"best: trial {best.index} acc {best.accuracy:.4f} {final.speedup:.2f}× (confirmed)"
    assert f"{final.speedup:.2f}×" in session.verdict()  # the final line's figure


def test_a_slower_trial_line_says_slower() -> None:
    session, _, _ = run_simulated(job_spec(maxTrials=6), simulated_space(), _accuracy, speed=lambda config: 0.76)
    passing = next(t for t in session.history.trials if t.passed)
    out = io.StringIO()
    with RichProgress(Console(file=out, width=200)) as progress:
        progress.trial_finished(passing, passing, 1.0)
    assert "0.76× [0.72–0.80] (slower than fp32) vs fp32" in out.getvalue()
