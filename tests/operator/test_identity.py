"""Who a job's pods run as (issue 12): the job's own generated ServiceAccount, or a named one that
exists and is opted in; a generated object of another owner is never used (a 409 is no success).
Driven through the real reconciler against the in-memory API fake."""

from __future__ import annotations

from typing import Any

import pytest
from opfakes import SIGNING_KEY, UID, job_body
from test_reconcile import BASELINE_POD, World, spec_dict

from qtune.operator import constants as c
from qtune.operator import status as st
from qtune.operator.config import OperatorConfig

CONFIG = OperatorConfig(prometheus_url="http://prom:9090", pushgateway_url="http://pgw:9091",
                        trial_image="qtune:test", signing_key=SIGNING_KEY)


def _world(account: str | None = None) -> World:
    spec = spec_dict(parallelTrials=2)
    if account:
        spec["trial"]["serviceAccountName"] = account
    return World(job_body(spec=spec), config=CONFIG)


def _account(name: str, labels: dict[str, str] | None = None, owner_uid: str | None = None,
             owner_kind: str = "Deployment") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "ml", "labels": dict(labels or {})}
    if owner_uid:
        meta["ownerReferences"] = [{"apiVersion": f"{c.GROUP}/v1" if owner_kind == c.KIND else "apps/v1",
                                    "kind": owner_kind, "name": "digits" if owner_kind == c.KIND else "web",
                                    "uid": owner_uid, "controller": True}]
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}


def _accounts_of_pods(world: World) -> dict[str, str]:
    return {name: pod["spec"]["serviceAccountName"] for name, pod in world.kube.pods.items()}


def test_every_pod_runs_as_the_jobs_own_account() -> None:
    world = _world()
    world.step()
    assert ("ServiceAccount", "digits-runner") in world.kube.objects
    world.finish_running()  # the baseline
    world.step()            # trials start
    accounts = _accounts_of_pods(world)
    assert "digits-trial-0" in accounts and set(accounts.values()) == {"digits-runner"}


def test_a_named_account_that_does_not_exist_is_invalid_spec() -> None:
    world = _world("team-sa")
    result = world.step()
    assert result.done and world.kube.status["state"] == st.FAILED_STATE
    assert world.kube.status["reason"] == st.INVALID_SPEC
    message = world.kube.status["message"]
    assert message.startswith("spec.trial.serviceAccountName: ServiceAccount 'team-sa' does not exist")
    assert f'{c.JOB_ACCOUNT_LABEL}="true"' in message
    assert not world.kube.pods
    assert ("ServiceAccount", "team-sa") not in world.kube.objects  # never created by the operator


@pytest.mark.parametrize("labels", [{}, {c.JOB_ACCOUNT_LABEL: "yes"}, {"app": "web"}])
def test_a_named_account_without_the_opt_in_label_is_invalid_spec(labels: dict[str, str]) -> None:
    world = _world("web-sa")
    world.kube.objects[("ServiceAccount", "web-sa")] = _account("web-sa", labels)
    before = dict(world.kube.objects[("ServiceAccount", "web-sa")])
    result = world.step()
    assert result.done and world.kube.status["reason"] == st.INVALID_SPEC
    message = world.kube.status["message"]
    assert message.startswith("spec.trial.serviceAccountName: ServiceAccount 'web-sa' is not opted in")
    assert c.JOB_ACCOUNT_LABEL in message
    assert not world.kube.pods
    assert world.kube.objects[("ServiceAccount", "web-sa")] == before  # not modified
    assert not [k for k in world.kube.objects if k[0] in ("Role", "RoleBinding")]


def test_an_opted_in_named_account_is_used_by_every_pod_and_never_changed() -> None:
    world = _world("team-sa")
    world.kube.objects[("ServiceAccount", "team-sa")] = _account("team-sa", {c.JOB_ACCOUNT_LABEL: "true"})
    before = dict(world.kube.objects[("ServiceAccount", "team-sa")])
    world.step()
    assert _accounts_of_pods(world) == {BASELINE_POD: "team-sa"}
    assert ("ServiceAccount", "digits-runner") not in world.kube.objects
    binding = world.kube.objects[("RoleBinding", "qtune-publish-team-sa")]  # one per named account
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "team-sa", "namespace": "ml"}]
    world.finish_running()
    world.step()
    accounts = _accounts_of_pods(world)
    assert "digits-trial-0" in accounts and set(accounts.values()) == {"team-sa"}
    assert world.kube.objects[("ServiceAccount", "team-sa")] == before


@pytest.mark.parametrize("kind", ["ServiceAccount", "Role", "RoleBinding"])
def test_a_generated_object_owned_by_someone_else_is_a_conflict(kind: str) -> None:
    world = _world()
    squatter = _account("digits-runner", owner_uid="someone-elses-uid")
    squatter["kind"] = kind
    world.kube.objects[(kind, "digits-runner")] = squatter
    result = world.step()
    assert result.done and world.kube.status["state"] == st.FAILED_STATE
    assert world.kube.status["reason"] == st.OBJECT_CONFLICT
    assert f"{kind} ml/digits-runner exists and is not owned by this job" in world.kube.status["message"]
    assert not world.kube.pods
    assert world.kube.objects[(kind, "digits-runner")] == squatter


def test_a_generated_object_of_an_earlier_job_of_the_name_is_waited_for() -> None:
    world = _world()
    world.kube.objects[("ServiceAccount", "digits-runner")] = _account(
        "digits-runner", owner_uid="uid-of-an-earlier-digits", owner_kind=c.KIND)
    result = world.step()
    assert not result.done and world.kube.status["reason"] == st.WAITING_FOR_CLEANUP
    assert not world.kube.pods
    del world.kube.objects[("ServiceAccount", "digits-runner")]  # the garbage collector deleted it
    world.step()
    accounts = _accounts_of_pods(world)
    assert len(accounts) == 1 and set(accounts.values()) == {"digits-runner"}
    assert world.kube.objects[("ServiceAccount", "digits-runner")]["metadata"]["ownerReferences"][0]["uid"] == UID


def test_a_generated_account_owned_by_this_job_is_used() -> None:
    world = _world()
    world.kube.objects[("ServiceAccount", "digits-runner")] = _account("digits-runner", owner_uid=UID,
                                                                       owner_kind=c.KIND)
    world.step()
    assert world.kube.status["state"] != st.FAILED_STATE
    assert _accounts_of_pods(world) == {BASELINE_POD: "digits-runner"}


def test_switching_the_account_after_pods_ran_is_refused_naming_both_accounts() -> None:
    """spec.trial.serviceAccountName changed after the job's RoleBinding was made: the operator cannot rebind
    (it holds no update right on RoleBindings), and a baseline pod of the new account could not publish its
    tuning space while the old account kept the right. The change is refused (the account is pinned in the
    history before the first pod), naming the field and both accounts."""
    world = _world("team-sa")
    world.kube.objects[("ServiceAccount", "team-sa")] = _account("team-sa", {c.JOB_ACCOUNT_LABEL: "true"})
    world.step()
    world.kube.finish_pod(BASELINE_POD, phase="Failed", exitCode=1)  # a spec change is made to try again
    world.step()
    del world.body["spec"]["trial"]["serviceAccountName"]
    world.body["metadata"]["generation"] = 2
    world.restart()
    result = world.step()
    assert result.done and world.kube.status["reason"] == st.INVALID_SPEC, world.kube.status
    message = world.kube.status["message"]
    assert message.startswith("spec.trial.serviceAccountName: the job's pods were created with 'team-sa'"), message
    assert "now asks for none" in message
    # the pinned account (history) refuses it, although the RoleBinding went when the baseline was recorded
    assert ("RoleBinding", "qtune-publish-team-sa") not in world.kube.objects
    assert "digits-baseline-a1" not in world.kube.pods
