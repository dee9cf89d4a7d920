"""The one resume rule (qtune/tuning/resume.py): a run stopped by a budget goes on when that budget was raised
above what the run used; no other stop reason goes on by itself."""

from __future__ import annotations

import pytest
from simulated import job_spec, run_simulated, sensitive_accuracy, simulated_space

from qtune.tuning import stop
from qtune.tuning.resume import history_resume_message, resume_message, resumes

USED = {"trials": 10, "elapsed_seconds": 300.0, "failed_trials": 4}


@pytest.mark.parametrize(("tuning", "expected"), [
    ({"maxTrials": 11}, True),
    ({"maxTrials": 10}, False),
    ({"maxTrials": 5}, False),
])
def test_max_trials_goes_on_when_raised_above_the_trials_run(tuning, expected):
    assert resumes(stop.MAX_TRIALS, spec=job_spec(**tuning), **USED) is expected


@pytest.mark.parametrize(("tuning", "expected"), [
    ({"timeoutSeconds": 0}, True),     # no limit any more
    ({"timeoutSeconds": 301}, True),
    ({"timeoutSeconds": 300}, False),
    ({"timeoutSeconds": 100}, False),
])
def test_timeout_goes_on_when_the_limit_is_gone_or_above_the_elapsed_time(tuning, expected):
    assert resumes(stop.TIMEOUT, spec=job_spec(**tuning), **USED) is expected


@pytest.mark.parametrize(("tuning", "expected"), [
    ({}, True),                        # unset: no limit
    ({"maxFailedTrials": 5}, True),
    ({"maxFailedTrials": 4}, False),
    ({"maxFailedTrials": 2}, False),
])
def test_too_many_failures_goes_on_when_unset_or_raised_above_the_failed_trials(tuning, expected):
    assert resumes(stop.TOO_MANY_FAILURES, spec=job_spec(**tuning), **USED) is expected


@pytest.mark.parametrize("reason", [stop.GOAL_REACHED, stop.SEARCH_EXHAUSTED, stop.NO_SPEEDUP, stop.NO_CONFIG,
                                    stop.REPEATED_FAILURES, stop.BASELINE_FAILED, None])
def test_no_other_stop_reason_goes_on_by_itself(reason):
    generous = job_spec(maxTrials=10000, timeoutSeconds=0)
    assert not resumes(reason, spec=generous, **USED)


def test_the_message_names_the_budget():
    message = resume_message(stop.TIMEOUT, spec=job_spec(timeoutSeconds=600), **USED)
    assert message is not None and "timeoutSeconds is 600s" in message and "300s" in message


def test_from_a_history_counts_what_the_stop_rules_count():
    """A real run stopped by maxTrials: raising it resumes, the same spec does not."""
    spec = job_spec(maxTrials=3, confirmCandidates=0)
    session, _, reason = run_simulated(spec, simulated_space(), sensitive_accuracy())
    assert reason == stop.MAX_TRIALS
    history = session.history
    assert history_resume_message(history, spec, now=0.0) is None
    assert history_resume_message(history, job_spec(maxTrials=4, confirmCandidates=0), now=0.0) is not None
