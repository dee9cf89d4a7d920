"""The tuning session driven by the real engine loop (qtune.tuning.engine.drive) with a simulated
executor: lifecycle, stop rules, the honest outcome, the noise-aware winner and its confirmation."""

from __future__ import annotations

import itertools

import pytest
from simulated import (
    job_spec,
    run_simulated,
    sensitive_accuracy,
    simulated_space,
    speed_measurement,
)

from qtune.protocol import ConfirmResult, TrialResult
from qtune.tuning import stop
from qtune.tuning.contenders import confirm_rounds, contenders, pooled
from qtune.tuning.history import Baseline, History
from qtune.tuning.objective import select_best
from qtune.tuning.session import TuningSession

SENSITIVE = frozenset({"op04", "op10", "op16"})


def test_a_whole_job_baseline_trials_confirmation_winner():
    spec = job_spec()
    session, executor, reason = run_simulated(spec, simulated_space(), sensitive_accuracy())
    assert executor.started[0] == "baseline" and executor.started[-1] == "confirm"
    assert reason == stop.GOAL_REACHED and session.outcome() == stop.GOAL_REACHED
    best = session.best()
    assert best is not None and SENSITIVE <= set(best.tune_config.fp32_ops())
    assert len(session.history.trials) <= 12
    # the winner's figure is the confirmation's, the one every surface prints
    confirmed = session.history.confirmation.speed[str(best.index)]["32"]
    assert session.best_speed() == confirmed
    assert session.history.outcome == stop.GOAL_REACHED


def test_passing_configs_that_are_not_faster_end_in_no_speedup():
    spec = job_spec()
    session, _, reason = run_simulated(spec, simulated_space(), sensitive_accuracy(), speed=lambda config: 0.8)
    assert session.best() is not None  # configs meet the criterion ...
    assert reason != stop.GOAL_REACHED  # ... but none is faster than fp32: never a success
    assert session.outcome() == stop.NO_SPEEDUP
    assert "NoSpeedup" in session.verdict() and "not" not in session.verdict().split(":")[0]


def test_an_interval_touching_min_speedup_is_not_a_success():
    spec = job_spec(minSpeedup=1.5)
    session, _, _ = run_simulated(spec, simulated_space(), sensitive_accuracy(), speed=lambda config: 1.52,
                                  half_width=0.05)
    assert session.outcome() == stop.NO_SPEEDUP  # 1.52 × [0.95, 1.05] reaches below 1.5
    session, _, _ = run_simulated(spec, simulated_space(), sensitive_accuracy(), speed=lambda config: 1.7)
    assert session.outcome() == stop.GOAL_REACHED


def _record(history: History, index: int, fp32_ops: int, speedup: float, half: float, accuracy: float = 0.95):
    space = simulated_space()
    config = space.default_config().with_fallback(list(space.ops)[:fp32_ops])
    record = history.add(config)
    record.status, record.passed, record.accuracy = "succeeded", True, accuracy
    record.speed = {"32": speed_measurement(speedup, half)}
    assert record.index == index
    return record


def test_equal_speeds_go_to_the_more_accurate_then_the_faster_never_to_fewer_fp32_ops():
    history = History(job="overlap")
    _record(history, 0, fp32_ops=5, speedup=1.60, half=0.10)
    _record(history, 1, fp32_ops=1, speedup=1.50, half=0.10)  # overlaps trial 0, fewer fp32 ops: not a reason
    _record(history, 2, fp32_ops=0, speedup=1.10, half=0.02)  # clearly slower
    assert select_best(history, "latency", batch_size=32).index == 0
    history = History(job="apart")
    _record(history, 0, fp32_ops=5, speedup=1.60, half=0.02)
    _record(history, 1, fp32_ops=1, speedup=1.30, half=0.02, accuracy=0.96)  # more accurate, clearly slower
    assert select_best(history, "latency", batch_size=32).index == 0
    history = History(job="accuracy")
    _record(history, 0, fp32_ops=2, speedup=1.50, half=0.1, accuracy=0.94)
    _record(history, 1, fp32_ops=3, speedup=1.45, half=0.1, accuracy=0.95)  # as fast within doubt, more accurate
    assert select_best(history, "latency", batch_size=32).index == 1


def test_the_confirmation_takes_the_best_point_estimates_not_the_fewest_fp32_ops():
    """The issue's text recogniser: the fastest config in its own measurement had a wide interval and
    more fp32 ops; it must be among the re-measured candidates."""
    spec = job_spec(confirmCandidates=2)
    history = History(job="candidates")
    session = TuningSession(spec, history, simulated_space())
    history.baseline = Baseline(accuracy=0.95)
    _record(history, 0, fp32_ops=5, speedup=0.88, half=0.20)  # fastest point, wide interval
    _record(history, 1, fp32_ops=0, speedup=0.76, half=0.05)  # slowest, fewest fp32 ops
    _record(history, 2, fp32_ops=1, speedup=0.80, half=0.05)
    _record(history, 3, fp32_ops=6, speedup=0.86, half=0.15)
    unit = session.confirmation_unit()
    assert unit is not None and unit.candidates == (0, 3)
    history.trials[1].accuracy = 0.951  # now the winner so far (as fast within doubt, more accurate)
    unit = session.confirmation_unit()
    assert unit is not None and unit.candidates == (1, 0)  # the winner so far and the best point estimate


def test_overlapping_contenders_are_measured_again_and_the_faster_one_wins():
    """The confirmation's first pass cannot tell trials 0 and 1 apart (trial 2 is clearly slower); they
    alone are measured again and pooled, and the faster of the two in the pooled figures wins."""
    spec = job_spec()
    history = History(job="contenders")
    session = TuningSession(spec, history, simulated_space())
    history.baseline = Baseline(accuracy=0.95)
    _record(history, 0, fp32_ops=1, speedup=1.50, half=0.10)
    _record(history, 1, fp32_ops=4, speedup=1.48, half=0.10)
    _record(history, 2, fp32_ops=0, speedup=1.10, half=0.02)
    unit = session.confirmation_unit()
    assert unit is not None and unit.candidates == (0, 1, 2)
    truth = {"0": 1.40, "1": 1.56, "2": 1.12}
    sessions: list[list[str]] = []

    def measure(names: list[str]) -> dict:
        sessions.append(names)
        noisy = len(sessions) == 1  # the first pass: wide intervals, trial 0 read high
        return {name: {"32": speed_measurement(1.52 if noisy and name == "0" else truth[name],
                                               0.08 if noisy else 0.02)} for name in names}

    speed = confirm_rounds(measure, [str(i) for i in unit.candidates], "32")
    # the first pass measured all three, every further pass the two contenders only (fastest first)
    assert sessions[0] == ["0", "1", "2"] and len(sessions) >= 2 and all(s == ["1", "0"] for s in sessions[1:])
    session.record_confirm(ConfirmResult(candidates=list(unit.candidates), speed=speed))
    assert session.best().index == 1
    pooled_figure = session.best_speed()
    assert pooled_figure.rounds == 7 * len(sessions) and speed["2"]["32"].rounds == 7
    assert pooled_figure.fp32_p50_ms / pooled_figure.p50_ms == pytest.approx(pooled_figure.speedup)


def test_pooling_narrows_agreeing_passes_and_widens_disagreeing_ones():
    one = speed_measurement(1.50, 0.04)
    same = pooled([one, speed_measurement(1.50, 0.04)])
    assert same.speedup == pytest.approx(1.50)
    assert same.high - same.low < 0.8 * (one.high - one.low)
    apart = pooled([speed_measurement(1.30, 0.02), speed_measurement(1.70, 0.02)])
    assert apart.low < 1.32 and apart.high > 1.68  # the passes disagree beyond their intervals: no false precision
    assert contenders({"a": speed_measurement(1.5, 0.05), "b": speed_measurement(1.45, 0.05),
                       "c": speed_measurement(1.2, 0.02)}) == ["a", "b"]


def test_the_choice_does_not_depend_on_the_order_results_arrive_in():
    spec = job_spec(parallelTrials=3)
    runs = [run_simulated(spec, simulated_space(), sensitive_accuracy(), order=order)
            for order in ("index", "reverse", "shuffled")]
    sequences = [[t.config_key for t in session.history.trials] for session, _, _ in runs]
    winners = [session.best().config_key for session, _, _ in runs]
    assert sequences[0] == sequences[1] == sequences[2]
    assert len(set(winners)) == 1
    sequential, _, _ = run_simulated(job_spec(), simulated_space(), sensitive_accuracy())
    assert sequential.best().config_key == winners[0]


def test_resume_repeats_nothing_and_returns_the_same_winner(tmp_path):
    spec = job_spec(parallelTrials=2)
    uninterrupted, _, _ = run_simulated(spec, simulated_space(), sensitive_accuracy())
    partial, _, reason = run_simulated(spec, simulated_space(), sensitive_accuracy(), stop_after=3)
    assert reason is None and partial.history.stop_reason is None
    path = tmp_path / "history.json"
    partial.history.save(path)
    resumed, executor, _ = run_simulated(spec, simulated_space(), sensitive_accuracy(), history=History.load(path))
    keys = [t.config_key for t in resumed.history.trials]
    assert len(keys) == len(set(keys))
    assert "baseline" not in executor.started  # the recorded baseline is not run again
    assert resumed.best().config_key == uninterrupted.best().config_key


def test_the_wall_clock_limit_counts_the_baseline():
    spec = job_spec(timeoutSeconds=10)
    clock = itertools.count(start=0, step=6).__next__  # every turn of the loop takes 6 "seconds"
    session, executor, reason = run_simulated(spec, simulated_space(), sensitive_accuracy(), clock=clock)
    assert reason == stop.TIMEOUT
    # the baseline's turn counted: only one trial fits before 10 s, where 2 would without it
    assert len(session.history.trials) == 1
    assert executor.started[:2] == ["baseline", "trial-0"] and "confirm" not in executor.started


def test_no_trial_starts_that_the_wall_clock_limit_would_cut_short():
    """Trials take 60 s here: with 100 s left one more starts; with 50 s left none does and the job ends
    Timeout; with the confirmation to run, the time for it (3 passes of a trial's 10 s benchmark, x 1.5)
    is kept too, and the confirmation runs instead of a trial the limit would kill."""
    def session_at(confirm: int, now: float) -> TuningSession:
        spec = job_spec(timeoutSeconds=300, minSpeedup=2.0, confirmCandidates=confirm)
        history = History(job="time", started_at=0.0)
        history.baseline = Baseline(accuracy=0.95)
        for index in range(2):
            record = _record(history, index, fp32_ops=index, speedup=1.2, half=0.05)
            record.started_at, record.finished_at = 1000.0 + 100 * index, 1060.0 + 100 * index
            record.timings = {"benchmark": 10.0, "total": 60.0}
        return TuningSession(spec, history, simulated_space(), clock=lambda: now)

    assert session_at(0, 200.0).advance(frozenset(), 1).start[0].kind == "trial"
    late = session_at(0, 250.0)
    decision = late.advance(frozenset(), 1)
    assert decision.finished == stop.TIMEOUT and not decision.start and len(late.history.trials) == 2
    assert late.outcome() == stop.NO_SPEEDUP  # 1.2x is short of minSpeedup 2.0: no success claimed
    confirming = session_at(3, 200.0)
    decision = confirming.advance(frozenset(), 1)  # 200 + 60 + 45 > 300
    assert [unit.kind for unit in decision.start] == ["confirm"] and len(confirming.history.trials) == 2
    assert session_at(3, 190.0).advance(frozenset(), 1).start[0].kind == "trial"  # 190 + 60 + 45 <= 300


def test_too_many_failures_stops_but_a_passing_config_is_still_reported():
    spec = job_spec(maxFailedTrials=2)
    session, _, reason = run_simulated(spec, simulated_space(), sensitive_accuracy(), fail_trials={1, 2, 3, 4})
    assert reason == stop.TOO_MANY_FAILURES
    assert session.best() is None or session.outcome() in (stop.TOO_MANY_FAILURES, stop.NO_SPEEDUP)
    spec = job_spec(maxFailedTrials=2, parallelTrials=1)
    # the default passes: failures afterwards do not hide it
    session, _, reason = run_simulated(spec, simulated_space(), lambda config: 0.95, fail_trials={1, 2})
    assert session.best() is not None


def test_the_confirmation_decides_and_a_failed_one_falls_back_to_trial_figures():
    spec = job_spec()
    history = History(job="confirm")
    session = TuningSession(spec, history, simulated_space())
    history.baseline = Baseline(accuracy=0.95)
    _record(history, 0, fp32_ops=3, speedup=1.80, half=0.02)
    _record(history, 1, fp32_ops=1, speedup=1.40, half=0.02)
    assert session.best().index == 0
    unit = session.confirmation_unit()
    assert unit is not None and unit.candidates == (0, 1)
    # measured side by side, trial 0's figure was an outlier: trial 1 is the faster
    session.record_confirm(ConfirmResult(candidates=[0, 1], speed={
        "0": {"32": speed_measurement(1.38, 0.03)}, "1": {"32": speed_measurement(1.42, 0.03)}}))
    assert session.best().index == 1
    assert session.best_speed().speedup == pytest.approx(1.42)
    assert session.confirmation_unit() is None
    session.record_unit_failure("confirm", "Crashed", "boom")
    assert session.best().index == 0 and session.best_speed().speedup == pytest.approx(1.80)


def test_a_result_is_recorded_once_and_a_foreign_config_is_ignored():
    spec = job_spec()
    history = History(job="once")
    session = TuningSession(spec, history, simulated_space())
    history.baseline = Baseline(accuracy=0.95)
    record = session.start_trials(1)[0]
    assert session.record_trial(TrialResult(trial=record.index, status="succeeded", config_key="other",
                                            accuracy=0.95)) is None
    assert session.record_trial(TrialResult(trial=record.index, status="succeeded", accuracy=0.95)) is not None
    assert session.record_trial(TrialResult(trial=record.index, status="failed", reason="late")) is None
    assert history.trials[0].ok and history.trials[0].reason is None


def test_a_failed_baseline_ends_the_job_with_its_message():
    spec = job_spec()
    session = TuningSession(spec, History(job="bad"))
    decision = session.advance(frozenset(), 1)
    assert [u.id for u in decision.start] == ["baseline"]
    session.record_unit_failure("baseline", "InvalidJob", "spec.data.evaluation: no labels")
    decision = session.advance(frozenset(), 1)
    assert decision.finished == stop.BASELINE_FAILED
    assert session.outcome() == stop.BASELINE_FAILED and "no labels" in session.verdict()
