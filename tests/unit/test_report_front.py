"""The report of a real session (driven by the engine with a simulated executor): the accuracy–speed front
table in report.md and report.html, the winner's one figure saying which it is, and the words of a
speedup below 1 ("slower", never "0.76× faster")."""

from __future__ import annotations

import re
from pathlib import Path

from simulated import job_spec, run_simulated, simulated_space

from qtune.report import write_report
from qtune.spec.models import JobSpec, QuantizationJob
from qtune.tuning import codec, stop
from qtune.tuning.front import session_front


def _job(spec: JobSpec) -> QuantizationJob:
    return QuantizationJob.model_validate({"apiVersion": "qtune.io/v1alpha1", "kind": "QuantizationJob",
                                           "metadata": {"name": "front"},
                                           "spec": spec.model_dump(by_alias=True, exclude_none=True)})


def _accuracy(config) -> float:  # type: ignore[no-untyped-def]
    return 0.95 - 0.001 * (24 - len(config.fp32_ops()))


def _front_section(markdown: str) -> str:
    return markdown.split("## Accuracy–speed front", 1)[1].split("## Trials", 1)[0]


def test_the_report_shows_the_front(tmp_path: Path) -> None:
    spec = job_spec(maxTrials=8)
    session, _, _ = run_simulated(spec, simulated_space(), _accuracy)
    front = session_front(session)
    best = session.best()
    assert best is not None and len(front) >= 2
    write_report(tmp_path, _job(spec), session)
    markdown = (tmp_path / "report.md").read_text()
    section = _front_section(markdown)
    rows = [line for line in section.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(row.split("|")[1]) for row in rows] == [e.trial for e in front]
    for row, entry in zip(rows, front, strict=True):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1] == f"{entry.accuracy:.4f}"
        assert cells[3].startswith(f"{entry.speedup:.2f}× [{entry.speed.low:.2f}–{entry.speed.high:.2f}]")
        assert cells[4] == ("confirmation" if entry.confirmed else "trial")
        assert cells[-1] == ("chosen" if entry.trial == best.index else "")
    assert "history.json" in section and "tune_config" in section
    # the winner's figure in the summary is the front's (one figure), and says which figure it is
    winner = next(e for e in front if e.winner)
    assert "speed at batch 32 (confirmed figure)" in markdown
    assert f"{winner.speedup:.2f}× faster than fp32" in markdown
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Accuracy–speed front</h2>" in page and page.count("<td>chosen</td>") == 1


def test_a_slower_winner_reads_slower(tmp_path: Path) -> None:
    spec = job_spec(maxTrials=6)
    session, _, _ = run_simulated(spec, simulated_space(), _accuracy, speed=lambda config: 0.76)
    assert session.outcome() == stop.NO_SPEEDUP
    write_report(tmp_path, _job(spec), session)
    markdown = (tmp_path / "report.md").read_text()
    assert "× faster" not in markdown
    assert "speedup 0.76×: 1.32× slower than fp32" in markdown
    assert "0.76× [0.74–0.78] (slower than fp32)" in _front_section(markdown)
    assert "1.32× slower than fp32" in session.verdict()
    assert "faster than fp32 beyond measurement doubt" in session.verdict()  # NoSpeedup says why


def test_the_output_history_names_the_front_and_best_config_stays_the_winners(tmp_path: Path) -> None:
    import json

    from qtune.local.driver import _publish, models_to_keep

    spec = job_spec(maxTrials=8)
    session, _, _ = run_simulated(spec, simulated_space(), _accuracy)
    best = session.best()
    assert best is not None
    _publish(tmp_path / "out", session, _job(spec))
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    front = history["front"]
    assert front["batch_size"] == 32
    assert [e["trial"] for e in front["entries"]] == [e.trial for e in session_front(session)]
    by_index = {t["index"]: t for t in history["trials"]}
    for entry in front["entries"]:  # a front config's tune config and model, found by its trial number
        record = by_index[entry["trial"]]
        assert record["tune_config"] and record["model_path"] == entry["model_path"]
        assert entry["winner"] == (entry["trial"] == best.index)
    best_config = json.loads((tmp_path / "out" / "best_config.json").read_text())
    assert best_config["trial"] == best.index and best_config["tune_config"] == codec.dump(best.tune_config)
    # keep-best keeps the models of the winner and of the whole front
    assert models_to_keep(session) == sorted({best.index} | {e["trial"] for e in front["entries"]})


def test_the_report_says_when_the_winner_is_not_on_the_front() -> None:
    from simulated import speed_measurement

    from qtune.report.report import front_intro
    from qtune.tuning.front import accuracy_speed_front
    from qtune.tuning.history import Baseline, History

    space = simulated_space()
    history = History(job="front", baseline=Baseline(accuracy=0.95))
    for index, (accuracy, speedup) in enumerate([(0.95, 1.50), (0.95, 1.45)]):
        record = history.add(space.default_config().with_fallback(list(space.ops)[:index]))
        record.status, record.passed, record.accuracy = "succeeded", True, accuracy
        record.speed = {"32": speed_measurement(speedup, 0.1)}
    # the winner rule may pick trial 1 (overlapping intervals, fewer fp32 ops): trial 0 beats it by point estimate
    front = accuracy_speed_front(history, 32, winner=1)
    assert [e.trial for e in front] == [0]
    assert "The chosen config, trial 1, is not on it" in front_intro(front, 32, history.trials[1])
    assert "not on it" not in front_intro(accuracy_speed_front(history, 32, winner=0), 32, history.trials[0])
