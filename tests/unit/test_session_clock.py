"""The session's clock is injected: the job's elapsed time, its wall-clock limit and the trials' timestamps come
from it alone, and History.elapsed is the one figure of the job's tuning time (stop rules, status, history.json)."""

from __future__ import annotations

import time

from simulated import FakeClock, job_spec, simulated_space

from qtune.protocol import TrialResult
from qtune.tuning import codec, stop
from qtune.tuning.history import Baseline, History
from qtune.tuning.session import TuningSession


def _ready_session(clock: FakeClock, **tuning: object) -> TuningSession:
    history = History(job="clock", baseline=Baseline(accuracy=0.95))
    return TuningSession(job_spec(**tuning), history, simulated_space(), clock=clock)


def test_the_timeout_is_decided_on_the_injected_clock():
    clock = FakeClock(5_000.0)
    session = _ready_session(clock, timeoutSeconds=60)
    started = session.advance(frozenset(), 1).start
    assert [u.id for u in started] == ["trial-0"] and session.history.started_at == 5_000.0
    assert session.history.trials[0].started_at == 5_000.0  # the trial's timestamp is the session's clock
    clock.now = 5_059.0
    assert session.elapsed() == 59.0 and not session.advance(frozenset({"trial-0"}), 1).finished
    clock.now = 5_060.0                               # the real time of day is far from this: only the clock counts
    decision = session.advance(frozenset({"trial-0"}), 1)
    assert decision.finished == stop.TIMEOUT and decision.cancel == ["trial-0"]
    assert session.history.trials[0].finished_at == 5_060.0 and session.history.trials[0].reason == stop.TIMEOUT


def test_a_finished_jobs_clock_stops_and_the_elapsed_time_is_one_figure():
    clock = FakeClock(100.0)
    session = _ready_session(clock, maxTrials=1, objective="size")
    history = session.history
    unit = session.advance(frozenset(), 1).start[0]
    clock.now = 130.0
    history.checkpoint(clock())                       # a save: the stored figure is current
    assert codec.dump(history)["elapsed_seconds"] == 30.0 == history.elapsed(clock())
    clock.now = 140.0
    session.record_trial(TrialResult(trial=unit.trial, status="succeeded", accuracy=0.95, model_size_bytes=10))
    assert session.advance(frozenset(), 1).finished == stop.MAX_TRIALS
    assert history.started_at is None and history.elapsed_seconds == 40.0
    clock.now = 10_000.0                              # time goes by after the end: the job's time does not
    assert session.elapsed() == 40.0 == codec.load(History, codec.dump(history)).elapsed(time.time())


def test_a_resumed_job_counts_the_time_of_every_run():
    clock = FakeClock(0.0)
    history = History(job="resumed", baseline=Baseline(accuracy=0.95), elapsed_seconds=50.0, stop_reason=None)
    session = TuningSession(job_spec(timeoutSeconds=80), history, simulated_space(), clock=clock)
    session.advance(frozenset(), 1)
    clock.now = 29.0
    assert not session.advance(frozenset({"trial-0"}), 1).finished
    clock.now = 30.0                                  # 50 s before, 30 s now: the limit of 80 s is reached
    assert session.advance(frozenset({"trial-0"}), 1).finished == stop.TIMEOUT
    assert history.elapsed_seconds == 80.0
