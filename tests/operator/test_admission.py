"""What a job may choose of its pods (issue 20, point 4): the operator's settings bound the image, the workspace
PVC (opt-in label) and the tolerations; the image, claim and account are pinned before the first pod; the
publishing right of a shared account lives only during its job's baseline. Driven through the real reconciler
against the in-memory API fake."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from opfakes import CLAIM, job_body, make_config
from test_reconcile import BASELINE_POD, World, spec_dict

from qtune.operator import constants as c
from qtune.operator import status as st
from qtune.operator.config import OperatorConfig

OTHER_UID = "11111111-2222-3333-4444-555555555555"


def _world(config: OperatorConfig | None = None, name: str = "digits", uid: str | None = None,
           **trial: Any) -> World:
    spec = spec_dict()
    spec["trial"].update(trial)
    body = job_body(name=name, spec=spec) if uid is None else job_body(name=name, spec=spec, uid=uid)
    return World(body, config=config or make_config())


def _refused(world: World, field: str) -> str:
    result = world.step()
    status = world.kube.status
    assert result.done and status["state"] == st.FAILED_STATE and status["reason"] == st.INVALID_SPEC, status
    assert status["message"].startswith(f"{field}: "), status["message"]
    assert not world.kube.pods, "no pod is created for a job that asks for what is not allowed"
    return str(status["message"])


def _config(**settings: Any) -> OperatorConfig:
    return dataclasses.replace(make_config(), **settings)


# ------------------------------------------------------------------------------------------- images
def test_an_image_the_operator_does_not_allow_is_invalid_spec() -> None:
    message = _refused(_world(image="attacker.example/miner:1"), "spec.trial.image")
    assert "'attacker.example/miner:1' is not one the operator allows (allowed: qtune:test)" in message
    assert "QTUNE_ALLOWED_IMAGES" in message


def test_the_operators_own_image_and_allowed_patterns_run() -> None:
    world = _world(image="qtune:test")
    world.step()
    assert world.kube.pods[BASELINE_POD]["spec"]["containers"][0]["image"] == "qtune:test"
    config = _config(allowed_images=("registry.example/team/*", "exact:1"))
    for image in ("registry.example/team/qtune:2", "exact:1"):
        world = _world(config, image=image)
        world.step()
        assert world.kube.pods[BASELINE_POD]["spec"]["containers"][0]["image"] == image
    message = _refused(_world(config, image="registry.example/teammate/x:1"), "spec.trial.image")
    assert "registry.example/team/*, exact:1" in message


def test_allowed_images_parse_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QTUNE_ALLOWED_IMAGES", " a:1 , reg/*,")
    monkeypatch.setenv("QTUNE_ALLOWED_TOLERATION_KEYS", "dedicated,example.com/*")
    monkeypatch.setenv("QTUNE_WORKSPACE_CLAIM_LABEL", "team.example/qtune = yes")
    config = OperatorConfig.from_env()
    assert config.allowed_images == ("a:1", "reg/*")
    assert config.allowed_toleration_keys == ("dedicated", "example.com/*")
    assert config.workspace_claim_label == "team.example/qtune=yes"
    monkeypatch.setenv("QTUNE_WORKSPACE_CLAIM_LABEL", "no-value")
    with pytest.raises(ValueError, match="QTUNE_WORKSPACE_CLAIM_LABEL"):
        OperatorConfig.from_env()


# ------------------------------------------------------------------------------------------- the workspace PVC
def test_a_pvc_without_the_opt_in_label_is_invalid_spec() -> None:
    world = _world()
    world.kube.add_claim(CLAIM, labels={"app": "web-database"})
    message = _refused(world, "spec.workspace.persistentVolumeClaim")
    assert "PVC 'qtune-work' is not opted in as a workspace (label qtune.io/workspace is None)" in message
    assert "kubectl label pvc <name> qtune.io/workspace=true" in message


def test_a_missing_pvc_is_invalid_spec() -> None:
    world = _world()
    del world.kube.objects[("PersistentVolumeClaim", CLAIM)]
    message = _refused(world, "spec.workspace.persistentVolumeClaim")
    assert "PVC 'qtune-work' does not exist in namespace ml" in message


def test_the_claim_label_is_a_setting_and_none_allows_any_pvc() -> None:
    world = _world(_config(workspace_claim_label="team.example/qtune=yes"))
    _refused(world, "spec.workspace.persistentVolumeClaim")  # the default label is not the configured one
    world = _world(_config(workspace_claim_label="team.example/qtune=yes"))
    world.kube.add_claim(CLAIM, labels={"team.example/qtune": "yes"})
    world.step()
    assert BASELINE_POD in world.kube.pods
    world = _world(_config(workspace_claim_label=""))
    del world.kube.objects[("PersistentVolumeClaim", CLAIM)]
    world.step()
    assert BASELINE_POD in world.kube.pods


# ------------------------------------------------------------------------------------------- tolerations
def test_a_toleration_of_a_key_not_allowed_is_invalid_spec() -> None:
    message = _refused(_world(tolerations=[{"key": "node-role.kubernetes.io/control-plane",
                                            "operator": "Exists"}]), "spec.trial.tolerations[0]")
    assert "taint key 'node-role.kubernetes.io/control-plane'" in message and "allowed taint keys: none" in message
    config = _config(allowed_toleration_keys=("dedicated", "example.com/*"))
    message = _refused(_world(config, tolerations=[{"key": "dedicated", "operator": "Exists"},
                                                   {"operator": "Exists"}]), "spec.trial.tolerations[1]")
    assert "every taint (a toleration without a key)" in message


def test_allowed_tolerations_reach_the_pod() -> None:
    config = _config(allowed_toleration_keys=("dedicated", "example.com/*"))
    tolerations = [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
                   {"key": "example.com/gpu", "operator": "Exists"}]
    world = _world(config, tolerations=tolerations)
    world.step()
    assert world.kube.pods[BASELINE_POD]["spec"]["tolerations"] == tolerations
    world = _world(_config(allowed_toleration_keys=("*",)), tolerations=[{"operator": "Exists"}])
    world.step()
    assert BASELINE_POD in world.kube.pods


# ------------------------------------------------------------------------------------------- pinned choices
@pytest.mark.parametrize(("section", "key", "value", "field"), [
    ("trial", "image", "registry.example/team/other:1", "spec.trial.image"),
    ("workspace", "persistentVolumeClaim", "other-claim", "spec.workspace.persistentVolumeClaim"),
])
def test_image_and_claim_cannot_change_once_the_job_started(section: str, key: str, value: str,
                                                            field: str) -> None:
    """An old CRD without the transition rules lets the edit through: the operator refuses it, comparing with
    what it pinned in the history before the first pod (a restart in between included)."""
    world = _world(_config(allowed_images=("registry.example/team/*",)))
    world.kube.add_claim("other-claim")
    world.step()
    assert BASELINE_POD in world.kube.pods
    world.body["spec"][section][key] = value
    world.body["metadata"]["generation"] = 2
    world.restart()
    created = list(world.kube.created_pods)
    result = world.step()
    status = world.kube.status
    assert result.done and status["reason"] == st.INVALID_SPEC, status
    assert status["message"].startswith(f"{field}: the job's pods were created with "), status["message"]
    assert f"now asks for '{value}'" in status["message"]
    assert world.kube.created_pods == created


def test_the_pinned_choices_are_stored_before_the_first_pod() -> None:
    from qtune.operator.store import HistoryStore

    world = _world()
    world.step()
    stored = __import__("asyncio").run(HistoryStore(world.kube, world.reconciler.job,
                                                  signing_key=world.reconciler.config.signing_key).load())
    assert stored is not None and stored.pinned == {"spec.trial.image": "",
                                                    "spec.workspace.persistentVolumeClaim": CLAIM,
                                                    "spec.trial.serviceAccountName": ""}


# ------------------------------------------------------------------------------------------- a shared account
def _team_account(world: World) -> None:
    world.kube.objects[("ServiceAccount", "team-sa")] = {
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "team-sa", "namespace": "ml", "labels": {c.JOB_ACCOUNT_LABEL: "true"}}}


def _rights_of(world: World, account: str) -> set[str]:
    """The ConfigMaps `account` may write through the RoleBindings that exist."""
    names: set[str] = set()
    for (kind, _), binding in world.kube.objects.items():
        if kind != "RoleBinding" or account not in [s["name"] for s in binding["subjects"]]:
            continue
        role = world.kube.objects[("Role", binding["roleRef"]["name"])]
        names.update(n for rule in role["rules"] for n in rule.get("resourceNames", []))
    return names


def test_jobs_sharing_an_account_do_not_accumulate_rights_over_each_others_baseline() -> None:
    """Job a's baseline publishes, is recorded, and its RoleBinding goes: when job b (same opted-in account)
    starts its baseline, the account may write b's baseline ConfigMap only, not a's. Without the revocation it
    could write both (a's binding, owned by a job that goes on for hours, would stay)."""
    first = _world(serviceAccountName="team-sa")
    _team_account(first)
    first.step()
    assert _rights_of(first, "team-sa") == {c.baseline_configmap("digits")}
    first.finish_running()  # the baseline publishes and succeeds
    first.step()            # recorded: trials start, the publishing right goes
    assert any(name.startswith("digits-trial-") for name in first.kube.pods)
    assert _rights_of(first, "team-sa") == set()
    assert ("RoleBinding", "qtune-publish-team-sa") in first.kube.deleted_objects

    second = _second_job(first)
    second.step()
    assert "resnet-baseline" in first.kube.pods
    assert _rights_of(first, "team-sa") == {c.baseline_configmap("resnet")}


def _second_job(first: World) -> World:
    """Job resnet of the same namespace (the same fake API server) and the same named account."""
    second = _world(name="resnet", uid=OTHER_UID, serviceAccountName="team-sa")
    second.kube = second.services.kube = first.kube
    second.restart()
    second.body["status"] = {}  # the fake keeps one status (the last patch, job a's): b has none yet
    return second


def test_baselines_of_a_shared_account_take_turns() -> None:
    """While job a's baseline may publish, job b's (same account) waits, WaitingForAccount naming a: the account
    never holds the right over two baseline ConfigMaps at once. Once a's baseline is recorded, b's starts."""
    first = _world(serviceAccountName="team-sa")
    _team_account(first)
    first.step()
    second = _second_job(first)
    result = second.step()
    assert not result.done and "resnet-baseline" not in first.kube.pods
    status = first.kube.status  # the fake keeps one status: the last job's patch
    assert status["reason"] == "WaitingForAccount", status
    assert "ServiceAccount team-sa publishes the baseline of job digits now" in status["message"]
    assert _rights_of(first, "team-sa") == {c.baseline_configmap("digits")}
    first.finish_running()
    first.step()  # a's baseline recorded: its binding goes
    second.step()
    assert "resnet-baseline" in first.kube.pods
    assert _rights_of(first, "team-sa") == {c.baseline_configmap("resnet")}


def test_a_job_that_ends_keeps_no_publishing_right() -> None:
    world = _world(serviceAccountName="team-sa")
    _team_account(world)
    world.step()
    assert _rights_of(world, "team-sa")
    world.body["spec"]["trial"]["image"] = "not-allowed:1"  # an old CRD let it through: the job fails
    world.body["metadata"]["generation"] = 2
    assert world.step().done and world.kube.status["reason"] == st.INVALID_SPEC
    assert _rights_of(world, "team-sa") == set()


def test_a_waiting_job_that_fails_leaves_the_holders_binding_alone() -> None:
    """Job b waits for the shared account and then fails: its revocation deletes only its own binding (a named
    account's binding may be another job's: a's baseline must still be able to publish)."""
    first = _world(serviceAccountName="team-sa")
    _team_account(first)
    first.step()
    second = _second_job(first)
    second.step()
    second.body["spec"]["trial"]["image"] = "not-allowed:1"
    second.body["metadata"]["generation"] = 2
    assert second.step().done and first.kube.status["reason"] == st.INVALID_SPEC
    assert _rights_of(first, "team-sa") == {c.baseline_configmap("digits")}
    assert ("RoleBinding", "qtune-publish-team-sa") not in first.kube.deleted_objects
