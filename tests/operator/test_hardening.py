"""Issue 12 (hostile input and faults), the operator's unit-testable points: job-supplied code is only
imported when the operator's configuration allows its module and can never end the operator;
per-job objects are identified by the job's uid, never by name; failure reasons that reach metric
labels and Event reasons come from a bounded set."""

from __future__ import annotations

import asyncio
import copy
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from opfakes import FakeKube, job_body, make_config, tiny_baseline, tiny_space
from test_reconcile import BASELINE_POD, World, spec_dict

from qtune import protocol
from qtune.operator import builders
from qtune.operator import constants as c
from qtune.operator import status as st
from qtune.operator.config import OperatorConfig, module_allowed
from qtune.operator.layout import JobRef
from qtune.operator.podstatus import KNOWN_REASONS, MESSAGE_LIMIT, OTHER, failure_of, summarize_pod
from qtune.operator.reconcile import build_session, validate
from qtune.operator.store import encode_history
from qtune.tuning import codec
from qtune.tuning.history import History


def _config(**overrides: Any) -> OperatorConfig:
    base = make_config()
    return OperatorConfig(**{**base.__dict__, **overrides})


def _module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> str:
    """A fresh importable module (unique name) whose import writes a marker file, then runs `body`."""
    name = f"qtune_hostile_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / f"{name}.imported"
    (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').close()\n{body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _imported(tmp_path: Path, name: str) -> bool:
    return (tmp_path / f"{name}.imported").exists()


def _status_condition(world: World, type_: str) -> dict[str, Any]:
    return next(cond for cond in world.kube.status["conditions"] if cond["type"] == type_)


# ------------------------------------------------------------------------------------------------
# 1. job-supplied code in the operator process
# ------------------------------------------------------------------------------------------------


def test_allowed_modules_setting_from_env_and_prefix_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    assert OperatorConfig().allowed_modules == ()
    monkeypatch.setenv("QTUNE_ALLOWED_MODULES", " acme.search , team_b ,")
    assert OperatorConfig.from_env().allowed_modules == ("acme.search", "team_b")
    assert OperatorConfig.env_name("allowed_modules") == "QTUNE_ALLOWED_MODULES"
    assert module_allowed("acme.search", ("acme.search",))
    assert module_allowed("acme.search.bayes", ("acme.search",))
    assert not module_allowed("acme.searchx", ("acme.search",))
    assert not module_allowed("acme", ("acme.search",))
    assert not module_allowed("anything", ())


def test_a_strategy_module_not_allowed_is_never_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = _module(tmp_path, monkeypatch, "raise SystemExit(3)")
    world = World(job_body(spec=spec_dict(strategy=f"{name}:Search")))
    result = world.step()
    assert not _imported(tmp_path, name) and name not in sys.modules
    assert result.done and world.kube.status["state"] == st.FAILED_STATE
    assert world.kube.status["reason"] == st.INVALID_SPEC
    message = world.kube.status["message"]
    assert message.startswith("spec.tuning.strategy:") and name in message and "QTUNE_ALLOWED_MODULES" in message
    assert _status_condition(world, "Failed")["reason"] == st.INVALID_SPEC
    assert not world.kube.created_pods and not world.kube.configmaps  # nothing created for the job


# KeyboardInterrupt-like: a BaseException that is not an Exception (a real KeyboardInterrupt would
# stop pytest itself before the fix, instead of failing this test)
@pytest.mark.parametrize("raising", ["raise SystemExit(2)", "class Stop(BaseException): pass\nraise Stop()",
                                     "x = 1 / 0"])
def test_an_allowed_module_raising_anything_on_import_is_invalid_spec(
        raising: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = _module(tmp_path, monkeypatch, raising)
    world = World(job_body(spec=spec_dict(strategy=f"{name}:Search")), config=_config(allowed_modules=(name,)))
    result = world.step()                           # returns: nothing escapes the step
    assert _imported(tmp_path, name)
    assert result.done and world.kube.status["state"] == st.FAILED_STATE
    assert world.kube.status["reason"] == st.INVALID_SPEC
    assert world.kube.status["message"].startswith("spec.tuning.strategy:")
    assert not world.kube.created_pods
    # and the operator goes on: a valid job is served afterwards
    other = World()
    assert other.step().state == st.BASELINE and BASELINE_POD in other.kube.pods


def test_cancellation_still_cancels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = _module(tmp_path, monkeypatch, "import asyncio; raise asyncio.CancelledError()")
    spec = validate(job_body(spec=spec_dict(strategy=f"{name}:Search")))[0]
    with pytest.raises(asyncio.CancelledError):
        build_session(spec, History(job="digits"), None, (name,))


def test_an_allowed_strategy_module_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = _module(tmp_path, monkeypatch, "from qtune.tuning.strategies.base import STRATEGIES\n"
                                          "Search = STRATEGIES['basic']")
    world = World(job_body(spec=spec_dict(strategy=f"{name}:Search")), config=_config(allowed_modules=(name,)))
    assert world.step().state == st.BASELINE and _imported(tmp_path, name)


def test_the_operator_never_imports_an_adaptor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = _module(tmp_path, monkeypatch, "raise SystemExit(1)")
    spec = spec_dict()
    spec["model"]["framework"] = f"{name}:Adaptor"
    world = World(job_body(spec=spec), config=_config(allowed_modules=(name,)))
    world.step()
    assert not _imported(tmp_path, name)


# ------------------------------------------------------------------------------------------------
# 2. identity by uid
# ------------------------------------------------------------------------------------------------

OLD_UID = "11111111-2222-3333-4444-555555555555"


def _foreign(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "data": {"owner": "someone else"},
            "metadata": {"name": name, "namespace": "ml", "resourceVersion": "7"}}


@pytest.mark.parametrize("name", ["digits-history", "digits-baseline", "digits-baseline-input"])
def test_an_unrelated_configmap_of_a_job_name_is_never_changed_or_deleted(name: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builders, "INLINE_INPUTS_LIMIT", 0)  # inputs too large for the pod get their ConfigMap
    world = World()
    assert name in (c.history_configmap("digits"), c.baseline_configmap("digits"), c.unit_inputs(BASELINE_POD))
    world.kube.configmaps[name] = _foreign(name)
    before = copy.deepcopy(world.kube.configmaps[name])
    result = world.step()
    for _ in range(3):
        if result.done:
            break
        result = world.step()
    assert world.kube.configmaps[name] == before
    assert ("ConfigMap", name) not in world.kube.deleted_objects
    assert result.done and world.kube.status["state"] == st.FAILED_STATE
    assert world.kube.status["reason"] == st.OBJECT_CONFLICT
    failed = _status_condition(world, "Failed")
    assert failed["reason"] == st.OBJECT_CONFLICT and f"ConfigMap ml/{name}" in failed["message"]
    assert not world.kube.created_pods  # no pod ever mounted or published into someone else's object


def test_a_recreated_job_does_not_adopt_the_old_jobs_history_or_baseline() -> None:
    old = JobRef("digits", "ml", OLD_UID)
    history = History(job="digits", baseline=tiny_baseline())
    history.add(tiny_space().default_config())
    data, binary = encode_history(history)
    kube = FakeKube()
    for body in (builders.configmap(old, c.history_configmap("digits"), c.ROLE_HISTORY, data, binary),
                 builders.configmap(old, c.baseline_configmap("digits"), c.ROLE_BASELINE,
                                    *protocol.encode_document(c.SPACE_KEY, codec.dump(tiny_space())))):
        asyncio.run(kube.create_configmap(body))
    before = copy.deepcopy(kube.configmaps)
    world = World()                                 # the new job: same name, another uid
    world.kube = kube
    world.services.kube = kube
    world.restart()
    result = world.step()
    assert not result.done and not kube.created_pods
    assert kube.configmaps == before                # the old job's objects are left to the GC
    assert world.kube.status["reason"] == st.WAITING_FOR_CLEANUP
    assert "earlier job" in world.kube.status["message"] and "best" not in world.kube.status
    # the garbage collector deletes the old job's objects: the new job starts from scratch
    kube.configmaps.clear()
    result = world.step()
    assert result.state == st.BASELINE and BASELINE_POD in kube.pods
    assert not world.history().trials and world.history().baseline is None
    owners = kube.configmaps[c.history_configmap("digits")]["metadata"]["ownerReferences"]
    assert [ref["uid"] for ref in owners] == [world.reconciler.job.uid]


# ------------------------------------------------------------------------------------------------
# 3. bounded reasons
# ------------------------------------------------------------------------------------------------


def _failed_pod(message: str, exit_code: int = protocol.EXIT_TRIAL_FAILED, reason: str = "Error") -> Any:
    return summarize_pod({
        "metadata": {"name": "digits-trial-0", "namespace": "ml", "labels": {}},
        "status": {"phase": "Failed", "reason": reason if reason != "Error" else None,
                   "containerStatuses": [{"name": "runner", "state": {"terminated": {
                       "exitCode": exit_code, "reason": "Error", "message": message}}}]}})


def test_a_termination_reason_outside_the_known_set_becomes_other() -> None:
    reason, message = failure_of(_failed_pod("Reason" + "x" * 5000 + ": boom"))
    assert reason == OTHER and "boom" not in message[:64] and len(message) <= MESSAGE_LIMIT
    reason, message = failure_of(_failed_pod("UserChosen42: details"))
    assert reason == OTHER and message.startswith("UserChosen42: details")
    assert failure_of(_failed_pod("TrialError: accuracy fell"))[0] == "TrialError"
    assert failure_of(_failed_pod("InvalidSpec: spec.x: bad", protocol.EXIT_JOB_UNUSABLE))[0] == st.INVALID_SPEC
    for message in ("y" * 10_000, ""):
        reason, text = failure_of(_failed_pod(message, reason="Evicted"))
        assert reason == "Evicted" and len(text) <= MESSAGE_LIMIT


def test_metric_labels_and_event_reasons_stay_bounded() -> None:
    world = World(job_body(spec=spec_dict(parallelTrials=3)))
    world.step()
    world.finish_running()                          # the baseline
    world.step()
    reasons = []
    for pod in sorted(world.running_pods()):        # every trial fails with a reason of its own making
        reasons.append(f"Custom{uuid.uuid4().hex}")
        world.kube.finish_pod(pod, phase="Failed", exitCode=protocol.EXIT_TRIAL_FAILED,
                              message=f"{reasons[-1]}: {'z' * 9000}")
    assert reasons
    world.step()
    labels = {s.labels["reason"] for m in world.metrics.trials_failed.collect() for s in m.samples
              if "reason" in s.labels}
    assert labels and labels <= KNOWN_REASONS | {OTHER}
    assert all(len(event[1]) <= 128 and event[1] not in reasons for event in world.events)
