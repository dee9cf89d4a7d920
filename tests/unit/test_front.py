"""The accuracy–speed front (qtune.tuning.front): dominance on point estimates, ties, configs that miss the
criterion or were not measured, the confirmation's figures, the bounded window, history.json's form, and
the words a speedup below 1 is printed with."""

from __future__ import annotations

import json

import pytest
from simulated import job_spec, run_simulated, simulated_space, speed_measurement

from qtune.protocol import SpeedMeasurement
from qtune.tuning import codec
from qtune.tuning.front import (
    accuracy_speed_front,
    front_document,
    front_window,
    session_front,
    speedup_text,
)
from qtune.tuning.history import Baseline, Confirmation, History, TrialRecord


def _record(history: History, accuracy: float | None, speedup: float | None, *, half: float = 0.05,
            passed: bool = True, status: str = "succeeded") -> TrialRecord:
    space = simulated_space()
    index = history.next_index()
    record = history.add(space.default_config().with_fallback(list(space.ops)[:index]))
    record.status, record.passed, record.accuracy = status, passed, accuracy
    if speedup is not None:
        record.speed = {"32": speed_measurement(speedup, half)}
    record.model_size_bytes = 1000 + index
    return record


def _history(*rows: tuple[float, float]) -> History:
    history = History(job="front", baseline=Baseline(accuracy=0.95))
    for accuracy, speedup in rows:
        _record(history, accuracy, speedup)
    return history


def _trials(history: History, **kwargs: object) -> list[int]:
    return [e.trial for e in accuracy_speed_front(history, 32, **kwargs)]  # type: ignore[arg-type]


def test_a_config_beaten_on_both_counts_is_not_on_the_front() -> None:
    history = _history((0.95, 1.2), (0.94, 1.5), (0.93, 1.4), (0.90, 2.0), (0.95, 1.1), (0.89, 1.9))
    # 2 loses to 1 (more accurate and faster), 4 to 0 (as accurate, faster), 5 to 3; most accurate first
    assert _trials(history) == [0, 1, 3]
    front = accuracy_speed_front(history, 32)
    assert [e.speedup for e in front] == sorted(e.speedup for e in front)  # speed rises as accuracy falls
    assert front[1].model_size_bytes == 1001 and front[1].fp32_ops == 1
    assert front[1].config_key == history.trials[1].config_key


def test_the_front_does_not_depend_on_the_order_of_the_trials() -> None:
    rows = [(0.95, 1.2), (0.94, 1.5), (0.93, 1.4), (0.90, 2.0), (0.95, 1.1)]
    forward = _history(*rows)
    backward = _history(*reversed(rows))
    key = {t.index: (t.accuracy, t.speedup(32)) for t in forward.trials}
    back = {t.index: (t.accuracy, t.speedup(32)) for t in backward.trials}
    assert [key[i] for i in _trials(forward)] == [back[i] for i in _trials(backward)]


def test_ties_equal_figures_both_stay_and_overlapping_intervals_are_marked() -> None:
    history = _history((0.95, 1.50), (0.95, 1.50), (0.94, 1.52), (0.93, 2.0))
    front = accuracy_speed_front(history, 32)
    # neither of two equal configs beats the other; 2 is faster by its point estimate, so it stays ...
    assert [e.trial for e in front] == [0, 1, 2, 3]
    # ... marked as within the noise of the more accurate row above; 3 is faster beyond doubt
    assert [e.clear_gain for e in front] == [None, False, False, True]
    # as accurate but slower by point estimate, even inside the interval: beaten
    history = _history((0.95, 1.50), (0.95, 1.49))
    assert _trials(history) == [0]


def test_failed_and_unmeasured_configs_are_left_out_and_misses_are_marked() -> None:
    history = History(job="front", baseline=Baseline(accuracy=0.95))
    _record(history, 0.95, 1.3)
    _record(history, None, None, passed=False, status="failed")  # crashed
    _record(history, 0.90, None, passed=False)  # missed the criterion: not benchmarked, no speed
    _record(history, 0.99, 9.0, status="pending")  # not finished
    miss = _record(history, 0.93, 1.8, passed=False)  # missed the criterion but was measured: faster
    _record(history, float("nan"), 3.0, passed=False)
    untrusted = _record(history, 0.96, 5.0)  # the machine was too busy for its figure: nothing decides on it
    untrusted.speed["32"].trusted = False
    front = accuracy_speed_front(history, 32)
    assert [(e.trial, e.passed) for e in front] == [(0, True), (miss.index, False)]
    # nothing measured at another batch size
    assert accuracy_speed_front(history, 1) == []


def test_lower_is_better_scores() -> None:
    history = _history((0.10, 1.2), (0.12, 1.5), (0.11, 1.1))  # e.g. an error rate
    assert _trials(history, higher_is_better=False) == [0, 1]
    assert _trials(history, higher_is_better=True) == [1]  # 0.12 the best score and the fastest


def test_the_confirmations_figure_counts_and_is_marked() -> None:
    history = _history((0.95, 1.2), (0.94, 1.5))
    # the confirmation re-measured trial 1 slower than trial 0: it no longer buys speed for its accuracy
    history.confirmation = Confirmation(status="succeeded", candidates=[0, 1],
                                        speed={"0": {"32": speed_measurement(1.30, 0.02)},
                                               "1": {"32": speed_measurement(1.25, 0.02)}})
    front = accuracy_speed_front(history, 32, winner=0)
    assert [(e.trial, e.speedup, e.confirmed, e.winner) for e in front] == [(0, 1.30, True, True)]


def test_the_window_is_bounded_and_holds_the_winner() -> None:
    history = _history(*[(0.99 - 0.01 * i, 1.0 + 0.1 * i) for i in range(9)])
    front = accuracy_speed_front(history, 32, winner=7)
    assert len(front) == 9
    shown = front_window(front, 5)
    assert [e.trial for e in shown] == [4, 5, 6, 7, 8]  # centred on the winner, shifted at the end
    middle = front_window(accuracy_speed_front(history, 32, winner=3), 5)
    assert [e.trial for e in middle] == [1, 2, 3, 4, 5]
    assert front_window(front, 20) == front and front_window(front, 0) == []
    for trial in history.trials[6:]:
        trial.passed = False
    no_winner = front_window(accuracy_speed_front(history, 32), 3)  # around the fastest passing entry
    assert [e.trial for e in no_winner] == [4, 5, 6]


def test_history_json_names_each_entry_by_its_trial_and_tune_config() -> None:
    history = _history((0.95, 1.2), (0.94, 1.5))
    document = front_document(accuracy_speed_front(history, 32, winner=1), 32)
    stored = json.loads(json.dumps({**codec.dump(history), "front": document}))
    assert stored["front"]["batch_size"] == 32 and "point estimates" in stored["front"]["rule"]
    entries = stored["front"]["entries"]
    assert [e["trial"] for e in entries] == [0, 1] and entries[1]["winner"] and not entries[0]["winner"]
    by_index = {t["index"]: t for t in stored["trials"]}
    for entry in entries:  # what a user does to pick one: its tune config is the trial's
        assert by_index[entry["trial"]]["tune_config"] == codec.dump(history.trials[entry["trial"]].tune_config)
        assert SpeedMeasurement.model_validate(entry["speed"]).speedup == entry["speedup"]
    assert codec.dump(codec.load(History, stored)) == codec.dump(history)  # derived, never read back as state


def test_a_run_marks_its_winner_on_the_front() -> None:
    spec = job_spec(maxTrials=8)
    session, _, _ = run_simulated(spec, simulated_space(), lambda config: 0.95 - 0.001 * (24 - len(config.fp32_ops())))
    best = session.best()
    front = session_front(session)
    assert best is not None and front
    winners = [e for e in front if e.winner]
    assert [e.trial for e in winners] == [best.index]
    # the figure beside it is the one every surface prints for the winner (the confirmation's)
    assert winners[0].confirmed and winners[0].speed == session.best_speed()
    # the trials that missed the criterion were not measured: none is on the front
    assert all(e.passed for e in front) and len(front) >= 2


@pytest.mark.parametrize("speedup,low,high,words", [
    (1.52, 1.41, 1.60, "1.52× faster than fp32"),
    (0.76, 0.66, 0.95, "1.32× slower than fp32"),
    (1.03, 0.95, 1.10, "as fast as fp32 within measurement doubt"),
    (0.97, 0.90, 1.05, "as fast as fp32 within measurement doubt"),
])
def test_a_slower_config_reads_slower(speedup: float, low: float, high: float, words: str) -> None:
    measured = SpeedMeasurement(batch_size=8, p50_ms=10 / speedup, p90_ms=11 / speedup, fp32_p50_ms=10,
                                fp32_p90_ms=11, speedup=speedup, low=low, high=high, rounds=9)
    assert measured.against_fp32() == words
    assert "faster" not in measured.describe() or low > 1.0
    if high < 1.0:
        assert "slower than fp32" in measured.describe()
        assert speedup_text(speedup, low, high) == f"{speedup:.2f}× [{low:.2f}–{high:.2f}] (slower than fp32)"
    else:
        assert speedup_text(speedup, low, high) == f"{speedup:.2f}× [{low:.2f}–{high:.2f}]"
