"""Pod builder output: QoS, affinity (default and override), securityContext, ownerRef, command."""

from __future__ import annotations

import json

import pytest
from opfakes import UID, job_body

from qtune.operator import constants as c
from qtune.operator import pods
from qtune.operator.config import OperatorConfig
from qtune.operator.reconcile import validate
from qtune.spec.load import job_from_dict

CONFIG = {"approach": "static", "format": "QDQ", "calibration_sampling_size": 100, "ops": {}, "extras": {}}


def _trial(body: dict | None = None, config: OperatorConfig | None = None, index: int = 3) -> dict:
    body = body or job_body()
    spec, spec_dict = validate(body)
    return pods.trial_pod(pods.JobRef.from_body(body), spec, spec_dict, index, CONFIG,
                          config or OperatorConfig(pushgateway_url="http://pgw:9091"), "abc123")


def _arg(pod: dict, flag: str) -> str:
    args = pod["spec"]["containers"][0]["args"]
    return args[args.index(flag) + 1]


def test_guaranteed_qos_whole_cpus() -> None:
    container = _trial()["spec"]["containers"][0]
    assert container["resources"]["requests"] == container["resources"]["limits"] == {"cpu": "2", "memory": "1Gi"}


def test_cpu_written_as_a_string_quantity_is_accepted() -> None:
    body = job_body()
    body["spec"]["trial"]["resources"]["cpu"] = "4"
    pod = _trial(body)
    assert pod["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "4"
    assert _arg(pod, "--threads") == "4"


def test_owner_reference_and_labels() -> None:
    pod = _trial()
    meta = pod["metadata"]
    assert meta["name"] == "digits-trial-3" and meta["namespace"] == "ml"
    assert meta["ownerReferences"] == [{"apiVersion": "qtune.io/v1alpha1", "kind": "QuantizationJob",
                                        "name": "digits", "uid": UID, "controller": True,
                                        "blockOwnerDeletion": True}]
    assert meta["labels"][c.LABEL_JOB] == "digits"
    assert meta["labels"][c.LABEL_TRIAL] == "3"
    assert meta["labels"][c.LABEL_JOB_UID] == UID
    assert meta["labels"][c.LABEL_MANAGED_BY] == c.MANAGED_BY


def test_default_affinity_is_the_intel_xeon_pool() -> None:
    affinity = _trial()["spec"]["affinity"]["nodeAffinity"]
    terms = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [
        {"key": "feature.node.kubernetes.io/cpu-model.vendor_id", "operator": "In", "values": ["Intel"]},
        {"key": "feature.node.kubernetes.io/cpu-cpuid.AVX512VNNI", "operator": "In", "values": ["true"]},
    ]}]


def test_isa_label_is_configurable() -> None:
    config = OperatorConfig(isa_label="feature.node.kubernetes.io/cpu-cpuid.AMXINT8")
    terms = _trial(config=config)["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][1]["key"].endswith("AMXINT8")


def test_affinity_override_replaces_the_default() -> None:
    override = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "qtune.io/pool", "operator": "In", "values": ["dedicated"]}]}]}}
    body = job_body()
    body["spec"]["trial"]["nodeAffinity"] = override
    assert _trial(body)["spec"]["affinity"]["nodeAffinity"] == override


def test_bare_node_selector_terms_are_the_required_terms() -> None:
    terms = [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["xeon-1"]}]}]
    body = job_body()
    body["spec"]["trial"]["nodeAffinity"] = {"nodeSelectorTerms": terms}
    affinity = _trial(body)["spec"]["affinity"]["nodeAffinity"]
    assert affinity == {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}


def test_node_selector_and_tolerations_from_the_spec() -> None:
    body = job_body()
    toleration = {"key": "qtune.io/dedicated", "operator": "Equal", "value": "tuning", "effect": "NoSchedule"}
    body["spec"]["trial"]["nodeSelector"] = {"qtune.io/dedicated": "tuning"}
    body["spec"]["trial"]["tolerations"] = [toleration]
    spec = _trial(body)["spec"]
    assert spec["nodeSelector"] == {"qtune.io/dedicated": "tuning"}
    assert spec["tolerations"] == [toleration]
    assert "nodeSelector" not in _trial()["spec"] and "tolerations" not in _trial()["spec"]


def test_security_context() -> None:
    pod = _trial()
    assert pod["spec"]["securityContext"] == {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                              "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}}
    sc = pod["spec"]["containers"][0]["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_volumes_tmp_and_workspace() -> None:
    pod = _trial()
    assert {"name": "tmp", "emptyDir": {}} in pod["spec"]["volumes"]
    assert {"name": "workspace", "persistentVolumeClaim": {"claimName": "qtune-work"}} in pod["spec"]["volumes"]
    mounts = pod["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "tmp", "mountPath": "/tmp"} in mounts
    assert {"name": "workspace", "mountPath": "/workspace"} in mounts


def test_command_env_and_restart_policy() -> None:
    pod = _trial()
    container = pod["spec"]["containers"][0]
    assert pod["spec"]["restartPolicy"] == "Never"
    assert container["command"] == ["python", "-m", "qtune.runner"]
    assert container["args"][0] == "trial"
    assert _arg(pod, "--threads") == "2"
    assert _arg(pod, "--index") == "3"
    assert json.loads(_arg(pod, "--config")) == CONFIG
    assert _arg(pod, "--base-dir") == "/workspace"
    assert _arg(pod, "--workspace") == f"/workspace/.qtune/digits-{UID[:8]}"
    assert _arg(pod, "--job-uid") == UID
    assert _arg(pod, "--pushgateway") == "http://pgw:9091"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["QTUNE_JOB_UID"] == UID
    assert env["QTUNE_PUSHGATEWAY_URL"] == "http://pgw:9091"
    assert env["OMP_NUM_THREADS"] == "2"
    assert pod["spec"]["activeDeadlineSeconds"] == 1800


def test_the_job_json_is_a_valid_job() -> None:
    job = job_from_dict(json.loads(_arg(_trial(), "--job-json")))
    assert job.name == "digits" and job.spec.tuning.objective == "size"


def test_image_default_and_override() -> None:
    assert _trial(config=OperatorConfig(trial_image="qtune:1"))["spec"]["containers"][0]["image"] == "qtune:1"
    body = job_body()
    body["spec"]["trial"]["image"] = "mine:2"
    body["spec"]["trial"]["imagePullPolicy"] = "Never"
    container = _trial(body, OperatorConfig(trial_image="qtune:1"))["spec"]["containers"][0]
    assert container["image"] == "mine:2" and container["imagePullPolicy"] == "Never"


def test_baseline_pod_publishes_with_its_own_account() -> None:
    body = job_body()
    spec, spec_dict = validate(body)
    job = pods.JobRef.from_body(body)
    pod = pods.baseline_pod(job, spec, spec_dict, OperatorConfig())
    assert pod["metadata"]["name"] == "digits-baseline"
    assert pod["metadata"]["labels"][c.LABEL_TRIAL] == "baseline"
    assert pod["spec"]["containers"][0]["args"][0] == "baseline"
    assert _arg(pod, "--publish-configmap") == "digits-baseline"
    assert pod["spec"]["serviceAccountName"] == "digits-runner"
    assert pod["spec"]["automountServiceAccountToken"] is True
    role = next(o for o in pods.runner_rbac(job) if o["kind"] == "Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["digits-baseline"],
                              "verbs": ["get", "update", "patch"]}]
    # a job's own ServiceAccount gets the same narrow binding; no account is created then
    own = pods.runner_rbac(job, "team-sa")
    assert [o["kind"] for o in own] == ["Role", "RoleBinding"]
    assert own[1]["subjects"] == [{"kind": "ServiceAccount", "name": "team-sa", "namespace": "ml"}]


def test_a_job_without_pvc_cannot_run_on_the_cluster() -> None:
    from qtune.spec.errors import SpecError

    body = job_body()
    del body["spec"]["workspace"]
    with pytest.raises(SpecError, match="persistentVolumeClaim"):
        validate(body)


def _pod_status(phase: str, **terminated: object) -> dict:
    return {"metadata": {"name": "digits-trial-1", "namespace": "ml",
                         "labels": {c.LABEL_JOB_UID: UID, c.LABEL_TRIAL: "1"}},
            "status": {"phase": phase, "containerStatuses": [{"name": "runner",
                                                              "state": {"terminated": terminated}}]}}


def test_failure_reasons() -> None:
    oom = pods.summarize_pod(_pod_status("Failed", exitCode=137, reason="OOMKilled"))
    assert pods.failure_of(oom)[0] == "OOMKilled"
    trial = pods.summarize_pod(_pod_status("Failed", exitCode=2, reason="Error",
                                           message="TrialError: ValueError: bad scale"))
    assert pods.failure_of(trial) == ("TrialError", "ValueError: bad scale")
    crash = pods.summarize_pod(_pod_status("Failed", exitCode=139, reason="Error", message="Segmentation fault"))
    assert pods.failure_of(crash) == ("Crashed", "exit code 139; Segmentation fault")
    deadline = pods.summarize_pod({**_pod_status("Failed"),
                                   "status": {"phase": "Failed", "reason": "DeadlineExceeded"}})
    assert pods.failure_of(deadline)[0] == "Timeout"
    summary = pods.summarize_pod(_pod_status("Succeeded", exitCode=0, message='{"model_path": "/w/m.onnx"}'))
    assert summary.index == 1 and summary.done and pods.model_path_of(summary) == "/w/m.onnx"


def test_operator_defaults_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    toleration = {"key": "qtune.io/dedicated", "operator": "Equal", "value": "tuning", "effect": "NoSchedule"}
    monkeypatch.setenv("QTUNE_TRIAL_VENDOR", "GenuineIntel")
    monkeypatch.setenv("QTUNE_TRIAL_TOLERATIONS", json.dumps([toleration]))
    monkeypatch.setenv("QTUNE_TRIAL_SERVICE_ACCOUNT", "qtune-trial")
    monkeypatch.setenv("QTUNE_POD_ENV", json.dumps({"HTTPS_PROXY": "http://proxy:3128"}))
    monkeypatch.setenv("QTUNE_RUNNER_COMMAND", "python -m mypkg.runner")
    config = OperatorConfig.from_env(trial_image="qtune:2")
    pod = _trial(config=config)
    assert pod["spec"]["tolerations"] == [toleration]
    assert pod["spec"]["serviceAccountName"] == "qtune-trial"
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["GenuineIntel"]
    container = pod["spec"]["containers"][0]
    assert {"name": "HTTPS_PROXY", "value": "http://proxy:3128"} in container["env"]
    assert container["command"] == ["python", "-m", "mypkg.runner"] and container["image"] == "qtune:2"
    # a job's own tolerations win; the baseline pod keeps its publishing account
    body = job_body()
    body["spec"]["trial"]["tolerations"] = [{"key": "other", "operator": "Exists"}]
    assert _trial(body, config)["spec"]["tolerations"] == [{"key": "other", "operator": "Exists"}]
    spec, spec_dict = validate(job_body())
    baseline = pods.baseline_pod(pods.JobRef.from_body(job_body()), spec, spec_dict, config)
    assert baseline["spec"]["serviceAccountName"] == "digits-runner"
