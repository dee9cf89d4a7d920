"""qtune/operator/results.py: a result signed by an EARLIER attempt of its unit (the pod was deleted
after it pushed, the unit runs again) is stale, ignored without a rejection; any other bad signature
is still rejected."""

from __future__ import annotations

from qtune import protocol
from qtune.operator import constants as c
from qtune.operator.layout import JobRef
from qtune.operator.observe import observe
from qtune.operator.podstatus import PodSummary
from qtune.operator.results import ACCEPT, BAD_SIGNATURE, STALE, WAIT, Observed, judge
from qtune.tuning.config import TuneConfig
from qtune.tuning.history import History, TrialRecord

KEY = "operator-key"
JOB = JobRef("digits", "ns", "job-uid-1")
UNIT = "trial-0"


def _signed(attempt: int, key: str = KEY) -> Observed:
    result = protocol.TrialResult(trial=0, status="succeeded", config_key="k", accuracy=0.99)
    secret = protocol.derive_unit_secret(key, JOB.uid, UNIT, attempt)
    return Observed(UNIT, result, protocol.sign_result(JOB.uid, UNIT, result, secret))


def _pod(attempt: int, phase: str = "Running") -> PodSummary:
    return PodSummary(name=c.unit_pod(JOB.name, UNIT, attempt), namespace=JOB.namespace, job_uid=JOB.uid,
                      unit=UNIT, attempt=attempt, phase=phase, owner_uids=(JOB.uid,))


def test_earlier_attempts_result_is_stale_not_forged() -> None:
    assert judge(JOB, _signed(0), _pod(1), KEY) == STALE
    assert judge(JOB, _signed(1), _pod(3), KEY) == STALE
    assert judge(JOB, _signed(1), _pod(1), KEY) == WAIT
    assert judge(JOB, _signed(1), _pod(1, "Succeeded"), KEY) == ACCEPT
    # a later attempt's or another key's signature proves nothing
    assert judge(JOB, _signed(2), _pod(1), KEY) == BAD_SIGNATURE
    assert judge(JOB, _signed(0, key="other-key"), _pod(1), KEY) == BAD_SIGNATURE


def _history() -> History:
    history = History(JOB.name)
    history.trials.append(TrialRecord(index=0, config_key="k", tune_config=TuneConfig("static", "QDQ", {})))  # pending
    return history


def test_observe_ignores_a_stale_result_without_rejecting_it() -> None:
    pods = {UNIT: _pod(1, "Succeeded")}
    seen = observe(JOB, _history(), pods, {UNIT: _signed(0)}, None, KEY, {}, now=100.0)
    assert seen.rejected == [] and seen.outcomes == []
    assert UNIT in seen.awaiting  # the current attempt's own result is still awaited
    forged = observe(JOB, _history(), pods, {UNIT: _signed(0, key="other-key")}, None, KEY, {}, now=100.0)
    assert [verdict for _, verdict in forged.rejected] == [BAD_SIGNATURE]
