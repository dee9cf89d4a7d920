"""The session's failure policy, driven by the real engine loop with the simulated executor: trials that
fail alike in a row stop the job (RepeatedFailures) with the best passing config still reported, and an
infrastructure failure delays the next start (5 s doubling, capped) in both executors' terms."""

from __future__ import annotations

from simulated import FakeClock, job_spec, run_simulated, sensitive_accuracy, simulated_space

from qtune.spec.models import JobSpec
from qtune.tuning import codec, stop
from qtune.tuning.history import Baseline, History
from qtune.tuning.session import TuningSession


def spec_of(**tuning: object) -> JobSpec:
    """The random strategy goes on after any failure (basic stops when its first, all-int8 trial fails)."""
    return job_spec(strategy="random", **tuning)


OOM = ("OOMKilled", "the runner container was killed for exceeding its memory limit (512Mi)")


def test_three_oom_kills_in_a_row_stop_the_job_naming_the_cause_and_the_fix():
    failures = {i: OOM for i in range(0, 50)}
    session, executor, reason = run_simulated(spec_of(maxTrials=8), simulated_space(), sensitive_accuracy(),
                                              failures=failures)
    assert reason == stop.REPEATED_FAILURES
    assert [u for u in executor.started if u.startswith("trial-")] == ["trial-0", "trial-1", "trial-2"]
    assert session.outcome() == stop.REPEATED_FAILURES
    verdict = session.verdict()
    assert verdict.startswith("RepeatedFailures: 3 trials in a row were OOMKilled (trials 0, 1, 2)")
    assert "512Mi" in verdict and "raise spec.trial.resources.memory" in verdict


def test_the_threshold_is_configurable_and_zero_turns_it_off():
    failures = {i: OOM for i in range(0, 50)}
    session, _, reason = run_simulated(spec_of(maxTrials=8, maxConsecutiveFailures=5), simulated_space(),
                                       sensitive_accuracy(), failures=failures)
    assert reason == stop.REPEATED_FAILURES and len(session.history.trials) == 5
    session, _, reason = run_simulated(spec_of(maxTrials=6, maxConsecutiveFailures=0), simulated_space(),
                                       sensitive_accuracy(), failures=failures)
    assert reason != stop.REPEATED_FAILURES and len(session.history.trials) == 6


def test_different_failures_in_a_row_do_not_stop_the_job():
    failures = {0: OOM, 1: ("Crashed", "exit code 139; Segmentation fault"), 2: ("TrialError", "quantize failed"),
                3: OOM, 4: ("Crashed", "exit code 1; ModuleNotFoundError: No module named 'x'")}
    session, _, reason = run_simulated(spec_of(maxTrials=5), simulated_space(), sensitive_accuracy(),
                                       failures=failures)
    assert reason != stop.REPEATED_FAILURES and len(session.history.trials) == 5


def test_crashes_with_the_same_kind_of_message_count_as_alike_whatever_their_numbers():
    failures = {i: ("Crashed", f"exit code 1; RuntimeError: tensor {i * 7} at 0x{i + 4096:x} invalid")
                for i in range(50)}
    _, _, reason = run_simulated(spec_of(maxTrials=8), simulated_space(), sensitive_accuracy(), failures=failures)
    assert reason == stop.REPEATED_FAILURES


def test_a_success_between_failures_resets_the_count():
    failures = {0: OOM, 1: OOM, 3: OOM, 4: OOM, 6: OOM}
    session, _, reason = run_simulated(spec_of(maxTrials=7), simulated_space(), sensitive_accuracy(),
                                       failures=failures)
    assert reason != stop.REPEATED_FAILURES and len(session.history.trials) == 7


def test_a_passing_config_found_before_the_failures_is_still_reported():
    failures = {i: OOM for i in range(1, 50)}
    session, _, reason = run_simulated(spec_of(maxTrials=8), simulated_space(), lambda config: 0.95,
                                       failures=failures)
    assert reason == stop.REPEATED_FAILURES
    best = session.best()
    assert best is not None and best.index == 0
    assert "Best passing config so far: trial 0" in session.verdict()


def test_one_verdict_for_the_exit_code_and_the_job_state():
    """A run that stops RepeatedFailures after a passing trial fails alike locally and on the cluster: one
    rule (`stop.succeeded`) behind `qtune tune`'s exit code and the QuantizationJob's state."""
    from qtune.operator.status import FAILED_STATE, SUCCEEDED_STATE, state_for_outcome

    failures = {i: OOM for i in range(1, 50)}
    session, _, _ = run_simulated(spec_of(maxTrials=8), simulated_space(), lambda config: 0.95, failures=failures)
    outcome = session.outcome()
    assert outcome == stop.REPEATED_FAILURES and session.best() is not None
    assert stop.exit_code(outcome) == stop.EXIT_FAILED and state_for_outcome(outcome) == FAILED_STATE
    table = {stop.GOAL_REACHED: (0, SUCCEEDED_STATE), stop.MAX_TRIALS: (0, SUCCEEDED_STATE),
             stop.TIMEOUT: (0, SUCCEEDED_STATE), stop.NO_CONFIG: (3, FAILED_STATE),
             stop.NO_SPEEDUP: (4, FAILED_STATE), stop.BASELINE_FAILED: (5, FAILED_STATE)}
    for name, (code, state) in table.items():
        assert (stop.exit_code(name), state_for_outcome(name)) == (code, state), name


def test_running_trials_are_abandoned_when_the_failures_repeat():
    spec = spec_of(maxTrials=8, parallelTrials=2)
    history = History(job="parallel")
    clock = FakeClock()
    session = TuningSession(spec, history, simulated_space(), clock=clock)
    history.baseline = Baseline(accuracy=0.95)
    decision = session.advance(frozenset(), 2)
    assert [u.id for u in decision.start] == ["trial-0", "trial-1"]
    session.record_unit_failure("trial-0", *OOM)
    clock.now = 10.0
    decision = session.advance(frozenset({"trial-1"}), 2)
    assert decision.wait == 5.0 and not decision.start  # backing off while trial-1 runs
    session.record_unit_failure("trial-1", *OOM)
    clock.now = 15.0
    decision = session.advance(frozenset(), 2)
    assert decision.wait == 10.0 and not decision.start
    clock.now = 25.0
    decision = session.advance(frozenset(), 2)
    assert [u.id for u in decision.start] == ["trial-2", "trial-3"]
    session.record_unit_failure("trial-2", *OOM)
    clock.now = 26.0
    decision = session.advance(frozenset({"trial-3"}), 2)
    assert decision.finished == stop.REPEATED_FAILURES and decision.cancel == ["trial-3"]
    assert history.trials[3].reason == stop.ABANDONED


def test_infrastructure_failures_back_off_doubling_and_capped():
    failures = {i: ("Crashed", f"exit code {i}; killed") for i in range(0, 50)}  # not alike: never stops early
    slept: list[float] = []
    session, _, reason = run_simulated(spec_of(maxTrials=8, maxConsecutiveFailures=0), simulated_space(),
                                       sensitive_accuracy(), failures=failures, slept=slept)
    assert slept == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0, 60.0]
    assert len(session.history.trials) == 8


def test_a_config_failure_or_a_success_does_not_back_off():
    failures = {0: ("TrialError", "quantization failed for this config"), 2: OOM}
    slept: list[float] = []
    run_simulated(spec_of(maxTrials=4), simulated_space(), sensitive_accuracy(), failures=failures, slept=slept)
    assert slept == [5.0]  # only after the OOM kill of trial 2; trial 3 then starts 5 s later


def test_the_backoff_survives_a_restart_of_the_executor():
    spec = spec_of(maxTrials=8)
    history = History(job="restart")
    clock = FakeClock()
    session = TuningSession(spec, history, simulated_space(), clock=clock)
    history.baseline = Baseline(accuracy=0.95)
    session.advance(frozenset(), 1)
    session.record_unit_failure("trial-0", *OOM)
    clock.now = 100.0
    assert session.advance(frozenset(), 1).wait == 5.0
    restored = codec.load(History, codec.dump(history))  # e.g. the operator restarted and read its ConfigMap
    again = TuningSession(spec, restored, simulated_space(), clock=clock)
    clock.now = 103.0
    assert again.advance(frozenset(), 1).wait == 2.0
    clock.now = 105.0
    assert [u.id for u in again.advance(frozenset(), 1).start] == ["trial-1"]
