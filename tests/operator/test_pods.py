"""Builder output: QoS, affinity (default and override), securityContext, ownerRef, command, the
unit's inputs ConfigMap and Secret; pod status parsing."""

from __future__ import annotations

import copy
import json

import pytest
from opfakes import UID, job_body

from qtune import protocol
from qtune.operator import builders, podstatus
from qtune.operator import constants as c
from qtune.operator.config import OperatorConfig
from qtune.operator.layout import JobRef
from qtune.operator.rbac import runner_rbac
from qtune.operator.reconcile import validate
from qtune.spec.load import job_from_dict

CONFIG = {"approach": "static", "format": "QDQ", "calibration_sampling_size": 100, "ops": {}, "extras": {}}


def _plan(index: int = 3) -> builders.UnitPlan:
    return builders.UnitPlan(unit=f"trial-{index}", attempt=0, trial=index, tune_config=CONFIG)


def _trial(body: dict | None = None, config: OperatorConfig | None = None, index: int = 3) -> dict:
    body = body or job_body()
    spec, _ = validate(body)
    return builders.unit_pod(JobRef.from_body(body), spec, _plan(index),
                             config or OperatorConfig(pushgateway_url="http://pgw:9091"))


def _arg(pod: dict, flag: str) -> str:
    args = pod["spec"]["containers"][0]["args"]
    return args[args.index(flag) + 1]


def test_guaranteed_qos_whole_cpus() -> None:
    container = _trial()["spec"]["containers"][0]
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    # the QoS class depends on cpu and memory only (ephemeral storage is requested and limited apart)
    assert {k: requests[k] for k in ("cpu", "memory")} == {k: limits[k] for k in ("cpu", "memory")} \
        == {"cpu": "2", "memory": "1Gi"}


def test_ephemeral_storage_and_tmp_are_bounded() -> None:
    pod = _trial()
    resources = pod["spec"]["containers"][0]["resources"]
    assert resources["requests"]["ephemeral-storage"] == "1Gi"
    assert resources["limits"]["ephemeral-storage"] == "4Gi"
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}} in pod["spec"]["volumes"]
    config = OperatorConfig(ephemeral_storage_request="500Mi", ephemeral_storage_limit="", tmp_size_limit="1Gi")
    pod = _trial(config=config)
    resources = pod["spec"]["containers"][0]["resources"]
    assert resources["requests"]["ephemeral-storage"] == "500Mi" and "ephemeral-storage" not in resources["limits"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}} in pod["spec"]["volumes"]


def test_storage_settings_come_from_the_environment_and_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QTUNE_TMP_SIZE_LIMIT", "3Gi")
    monkeypatch.setenv("QTUNE_EPHEMERAL_STORAGE_LIMIT", "none")
    config = OperatorConfig.from_env()
    assert config.tmp_size_limit == "3Gi" and config.ephemeral_storage_limit == ""
    monkeypatch.setenv("QTUNE_TMP_SIZE_LIMIT", "3 GB")
    with pytest.raises(ValueError, match="quantity"):
        OperatorConfig.from_env()


def test_pull_policy_is_the_jobs_else_the_operators(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "imagePullPolicy" not in _trial()["spec"]["containers"][0]  # Kubernetes' own default
    monkeypatch.setenv("QTUNE_TRIAL_IMAGE_PULL_POLICY", "Never")
    config = OperatorConfig.from_env()
    assert _trial(config=config)["spec"]["containers"][0]["imagePullPolicy"] == "Never"
    body = job_body()
    body["spec"]["trial"]["imagePullPolicy"] = "Always"
    assert _trial(body, config=config)["spec"]["containers"][0]["imagePullPolicy"] == "Always"
    monkeypatch.setenv("QTUNE_TRIAL_IMAGE_PULL_POLICY", "Sometimes")
    with pytest.raises(ValueError, match=r"QTUNE_TRIAL_IMAGE_PULL_POLICY='Sometimes': .*Always, IfNotPresent, Never"):
        OperatorConfig.from_env()


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
    assert meta["labels"][c.LABEL_UNIT] == "trial-3" and meta["labels"][c.LABEL_ATTEMPT] == "0"
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


POOL = [{"key": "feature.node.kubernetes.io/cpu-model.vendor_id", "operator": "In", "values": ["Intel"]},
        {"key": "feature.node.kubernetes.io/cpu-cpuid.AVX512VNNI", "operator": "In", "values": ["true"]}]


def test_a_jobs_affinity_narrows_the_pool_never_replaces_it() -> None:
    """Issue 20: the job's required terms each get the Xeon pool's expressions (terms are ORed: a term without
    them would let the job's pods onto any node); its preferred terms are kept; the spec is not changed."""
    dedicated = {"key": "qtune.io/pool", "operator": "In", "values": ["dedicated"]}
    host = {"key": "kubernetes.io/hostname", "operator": "In", "values": ["gpu-1"]}
    preferred = [{"weight": 1, "preference": {"matchExpressions": [host]}}]
    override = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [dedicated]}, {"matchFields": [{"key": "metadata.name", "operator": "In",
                                                             "values": ["any"]}]}]},
        "preferredDuringSchedulingIgnoredDuringExecution": preferred}
    body = job_body()
    body["spec"]["trial"]["nodeAffinity"] = override
    before = copy.deepcopy(override)
    affinity = _trial(body)["spec"]["affinity"]["nodeAffinity"]
    assert affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] == [
        {"matchExpressions": [dedicated, *POOL]},
        {"matchFields": override["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][1][
            "matchFields"], "matchExpressions": POOL}]
    assert affinity["preferredDuringSchedulingIgnoredDuringExecution"] == preferred
    assert override == before


def test_bare_node_selector_terms_are_the_required_terms_within_the_pool() -> None:
    terms = [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["xeon-1"]}]}]
    body = job_body()
    body["spec"]["trial"]["nodeAffinity"] = {"nodeSelectorTerms": terms}
    affinity = _trial(body)["spec"]["affinity"]["nodeAffinity"]
    assert affinity == {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [*terms[0]["matchExpressions"], *POOL]}]}}


def test_an_affinity_of_preferences_only_keeps_the_pool_required() -> None:
    preferred = [{"weight": 5, "preference": {"matchExpressions": [
        {"key": "kubernetes.io/hostname", "operator": "In", "values": ["xeon-2"]}]}}]
    body = job_body()
    body["spec"]["trial"]["nodeAffinity"] = {"preferredDuringSchedulingIgnoredDuringExecution": preferred}
    affinity = _trial(body)["spec"]["affinity"]["nodeAffinity"]
    assert affinity == {"preferredDuringSchedulingIgnoredDuringExecution": preferred,
                        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                            {"matchExpressions": POOL}]}}


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


@pytest.mark.parametrize("unit", ["baseline", "trial-3", "confirm"])
def test_the_pvc_is_read_only_but_the_job_folder(unit: str) -> None:
    body = job_body()
    spec, _ = validate(body)
    plan = _plan() if unit == "trial-3" else builders.UnitPlan(unit=unit, candidates=(1,), candidate_configs={})
    pod = builders.unit_pod(JobRef.from_body(body), spec, plan, OperatorConfig())
    assert {"name": "workspace", "persistentVolumeClaim": {"claimName": "qtune-work"}} in pod["spec"]["volumes"]
    assert {"name": "inputs", "configMap": {"name": f"digits-{unit}-input"}} in pod["spec"]["volumes"]
    container = pod["spec"]["containers"][0]
    folder = f"/workspace/.qtune/digits-{UID[:8]}"
    assert container["volumeMounts"] == [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "workspace", "mountPath": "/workspace", "readOnly": True},
        {"name": "workspace", "mountPath": folder, "subPath": f".qtune/digits-{UID[:8]}"},
        {"name": "inputs", "mountPath": "/etc/qtune/unit", "readOnly": True},
    ]
    # the job's own folder is where it runs and what it is told to write to; the PVC root is only read
    assert container["workingDir"] == folder
    assert _arg(pod, "--workspace") == folder and _arg(pod, "--base-dir") == "/workspace"
    # nothing is imported from the working directory or the script's folder
    assert container["command"][:3] == ["python", "-P", "-m"]
    assert {"name": "PYTHONSAFEPATH", "value": "1"} in container["env"]


def test_a_custom_mount_path_keeps_the_subpath_relative() -> None:
    body = job_body()
    body["spec"]["workspace"]["mountPath"] = "/data/work/"
    mounts = _trial(body)["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "workspace", "mountPath": f"/data/work/.qtune/digits-{UID[:8]}",
            "subPath": f".qtune/digits-{UID[:8]}"} in mounts


def test_command_env_and_restart_policy() -> None:
    pod = _trial()
    container = pod["spec"]["containers"][0]
    assert pod["spec"]["restartPolicy"] == "Never"
    assert container["command"] == ["python", "-P", "-m", "qtune.runner"]
    assert container["args"][0] == "trial"
    assert _arg(pod, "--threads") == "2"
    assert _arg(pod, "--index") == "3"
    assert _arg(pod, "--config") == "/etc/qtune/unit/config.json"
    assert _arg(pod, "--job") == "/etc/qtune/unit/job.json"
    assert _arg(pod, "--base-dir") == "/workspace"
    assert _arg(pod, "--workspace") == f"/workspace/.qtune/digits-{UID[:8]}"
    assert _arg(pod, "--job-uid") == UID
    assert _arg(pod, "--pushgateway") == "http://pgw:9091"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["QTUNE_JOB_UID"] == UID
    assert env["QTUNE_PUSHGATEWAY_URL"] == "http://pgw:9091"
    assert env["OMP_NUM_THREADS"] == "2"
    assert env["QTUNE_UNIT_ATTEMPT"] == "0"  # the attempt the runner's write credential names
    assert pod["spec"]["activeDeadlineSeconds"] == 1800


def test_a_pod_knows_which_attempt_of_its_unit_it_is() -> None:
    body = job_body()
    spec, _ = validate(body)
    plan = builders.UnitPlan(unit="trial-3", attempt=4, trial=3, tune_config=CONFIG)
    pod = builders.unit_pod(JobRef.from_body(body), spec, plan, OperatorConfig(pushgateway_url="http://pgw:9091"))
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["QTUNE_UNIT_ATTEMPT"] == "4"  # the runner's results-gateway credential names it


def test_small_inputs_travel_in_the_pod_itself() -> None:
    """The job and the config fit in the pod's annotations: a downwardAPI volume mounts them where the runner reads
    them, and no ConfigMap is needed (the pod is created in the same round trip as the history is stored)."""
    body = job_body()
    spec, spec_dict = validate(body)
    files = builders.unit_input_files(JobRef.from_body(body), spec_dict, _plan())
    job = job_from_dict(json.loads(files["job.json"]))
    assert job.name == "digits" and job.spec.tuning.objective == "size"
    assert json.loads(files["config.json"]) == CONFIG
    assert builders.inline_inputs(files) == files
    pod = builders.unit_pod(JobRef.from_body(body), spec, _plan(), OperatorConfig(), inline=files)
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "inputs")
    items = {i["path"]: i["fieldRef"]["fieldPath"] for i in volume["downwardAPI"]["items"]}
    annotations = pod["metadata"]["annotations"]
    assert set(items) == {"job.json", "config.json"}
    for file, path in items.items():
        key = path.removeprefix("metadata.annotations['").removesuffix("']")
        assert annotations[key] == files[file]
    args = pod["spec"]["containers"][0]["args"]
    assert args[args.index("--config") + 1] == "/etc/qtune/unit/config.json"
    mount = next(m for m in pod["spec"]["containers"][0]["volumeMounts"] if m["name"] == "inputs")
    assert mount == {"name": "inputs", "mountPath": "/etc/qtune/unit", "readOnly": True}


def test_large_inputs_get_their_own_configmap() -> None:
    body = job_body()
    spec, spec_dict = validate(body)
    config = {**CONFIG, "extras": {"x": "y" * (builders.INLINE_INPUTS_LIMIT + 1)}}
    plan = builders.UnitPlan(unit="trial-3", attempt=0, trial=3, tune_config=config)
    files = builders.unit_input_files(JobRef.from_body(body), spec_dict, plan)
    assert builders.inline_inputs(files) is None
    inputs = builders.unit_inputs(JobRef.from_body(body), plan, files)
    assert inputs["metadata"]["name"] == "digits-trial-3-input"
    assert inputs["metadata"]["ownerReferences"][0]["uid"] == UID
    assert json.loads(inputs["data"]["config.json"]) == config
    pod = builders.unit_pod(JobRef.from_body(body), spec, plan, OperatorConfig())
    assert {"name": "inputs", "configMap": {"name": "digits-trial-3-input"}} in pod["spec"]["volumes"]
    assert not any(k.startswith("qtune.io/input.") for k in pod["metadata"].get("annotations") or {})


def test_a_2000_op_config_travels_in_the_configmap_not_argv() -> None:
    op = {"op_type": "MatMul", "activation": {"dtype": "uint8", "scheme": "asym", "granularity": "per_tensor",
                                              "algorithm": "minmax", "reduce_range": False},
          "weight": {"dtype": "int8", "scheme": "sym", "granularity": "per_channel", "algorithm": "minmax",
                     "reduce_range": False}}
    config = {**CONFIG, "ops": {f"/encoder/layer.{i // 10}/attention/MatMul_{i}": op for i in range(2000)}}
    plan = builders.UnitPlan(unit="trial-0", trial=0, tune_config=config)
    body = job_body()
    spec, spec_dict = validate(body)
    pod = builders.unit_pod(JobRef.from_body(body), spec, plan, OperatorConfig())
    assert max(len(a) for a in pod["spec"]["containers"][0]["args"]) < 200
    files = builders.unit_input_files(JobRef.from_body(body), spec_dict, plan)
    assert builders.inline_inputs(files) is None
    assert len(files["config.json"]) > 128 * 1024  # past Linux's per-argument limit
    assert json.loads(files["config.json"]) == config
    huge = builders.UnitPlan(unit="trial-0", trial=0, tune_config={**config, "extras": {"x": "y" * 1_100_000}})
    with pytest.raises(protocol.PayloadTooLarge):
        builders.unit_input_files(JobRef.from_body(body), spec_dict, huge)


def test_the_result_secret_reaches_only_its_pod() -> None:
    pod = _trial()
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["QTUNE_RESULT_SECRET"] == {"name": "QTUNE_RESULT_SECRET", "valueFrom": {
        "secretKeyRef": {"name": "digits-trial-3-key", "key": "secret"}}}
    secret = builders.unit_secret(JobRef.from_body(job_body()), _plan(), "n0nce")
    assert secret["kind"] == "Secret" and secret["stringData"] == {"secret": "n0nce"}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == UID
    text = json.dumps(pod)
    assert "n0nce" not in text


def test_image_default_and_override() -> None:
    assert _trial(config=OperatorConfig(trial_image="qtune:1"))["spec"]["containers"][0]["image"] == "qtune:1"
    body = job_body()
    body["spec"]["trial"]["image"] = "mine:2"
    body["spec"]["trial"]["imagePullPolicy"] = "Never"
    container = _trial(body, OperatorConfig(trial_image="qtune:1"))["spec"]["containers"][0]
    assert container["image"] == "mine:2" and container["imagePullPolicy"] == "Never"


def test_baseline_pod_publishes_with_its_own_account() -> None:
    body = job_body()
    spec, _ = validate(body)
    job = JobRef.from_body(body)
    pod = builders.unit_pod(job, spec, builders.UnitPlan(unit="baseline"), OperatorConfig())
    assert pod["metadata"]["name"] == "digits-baseline"
    assert pod["metadata"]["labels"][c.LABEL_UNIT] == "baseline"
    assert pod["spec"]["containers"][0]["args"][0] == "baseline"
    assert _arg(pod, "--publish-configmap") == "digits-baseline"
    assert pod["spec"]["serviceAccountName"] == "digits-runner"
    assert pod["spec"]["automountServiceAccountToken"] is True
    role = next(o for o in runner_rbac(job) if o["kind"] == "Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["digits-baseline"],
                              "verbs": ["get", "update", "patch"]}]
    # a job's own ServiceAccount gets the same narrow binding; no account is created then
    own = runner_rbac(job, "team-sa")
    assert [o["kind"] for o in own] == ["Role", "RoleBinding"]
    assert own[1]["subjects"] == [{"kind": "ServiceAccount", "name": "team-sa", "namespace": "ml"}]


def test_a_job_without_pvc_cannot_run_on_the_cluster() -> None:
    from qtune.spec.errors import SpecError

    body = job_body()
    del body["spec"]["workspace"]
    with pytest.raises(SpecError, match="persistentVolumeClaim"):
        validate(body)


def _pod_status(phase: str, **terminated: object) -> dict:
    return {"metadata": {"name": "digits-trial-1", "namespace": "ml", "ownerReferences": [{"uid": UID}],
                         "labels": {c.LABEL_JOB_UID: UID, c.LABEL_UNIT: "trial-1", c.LABEL_ATTEMPT: "0"}},
            "status": {"phase": phase, "containerStatuses": [{"name": "runner",
                                                              "state": {"terminated": terminated}}]}}


def test_failure_reasons() -> None:
    summarize, failure_of = podstatus.summarize_pod, podstatus.failure_of
    oom = summarize(_pod_status("Failed", exitCode=137, reason="OOMKilled"))
    assert failure_of(oom)[0] == "OOMKilled"
    trial = summarize(_pod_status("Failed", exitCode=2, reason="Error", message="TrialError: ValueError: bad scale"))
    assert failure_of(trial) == ("TrialError", "ValueError: bad scale")
    crash = summarize(_pod_status("Failed", exitCode=139, reason="Error", message="Segmentation fault"))
    assert failure_of(crash) == ("Crashed", "exit code 139; log output (last lines): Segmentation fault")
    deadline = summarize({**_pod_status("Failed"), "status": {"phase": "Failed", "reason": "DeadlineExceeded"}})
    assert failure_of(deadline)[0] == "Timeout"
    spec = summarize(_pod_status("Failed", exitCode=1, message="spec.model.framework: unknown framework 'x'"))
    assert failure_of(spec) == ("InvalidSpec", "spec.model.framework: unknown framework 'x'")
    summary = summarize(_pod_status("Succeeded", exitCode=0))
    assert summary.unit == "trial-1" and summary.done and summary.owned_by("ml", UID)
    assert not summary.owned_by("other", UID) and not summary.owned_by("ml", "x")


def test_operator_defaults_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    toleration = {"key": "qtune.io/dedicated", "operator": "Equal", "value": "tuning", "effect": "NoSchedule"}
    monkeypatch.setenv("QTUNE_TRIAL_VENDOR", "GenuineIntel")
    monkeypatch.setenv("QTUNE_TRIAL_TOLERATIONS", json.dumps([toleration]))
    monkeypatch.setenv("QTUNE_POD_ENV", json.dumps({"HTTPS_PROXY": "http://proxy:3128"}))
    monkeypatch.setenv("QTUNE_RUNNER_COMMAND", "python -m mypkg.runner")
    config = OperatorConfig.from_env(trial_image="qtune:2")
    pod = _trial(config=config)
    assert pod["spec"]["tolerations"] == [toleration]
    assert pod["spec"]["serviceAccountName"] == "digits-runner"  # every pod: the job's own account
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["GenuineIntel"]
    container = pod["spec"]["containers"][0]
    assert {"name": "HTTPS_PROXY", "value": "http://proxy:3128"} in container["env"]
    assert container["command"] == ["python", "-m", "mypkg.runner"] and container["image"] == "qtune:2"
    # a job's own tolerations win; the baseline pod keeps its publishing account
    body = job_body()
    body["spec"]["trial"]["tolerations"] = [{"key": "other", "operator": "Exists"}]
    assert _trial(body, config)["spec"]["tolerations"] == [{"key": "other", "operator": "Exists"}]
    spec, _ = validate(job_body())
    baseline = builders.unit_pod(JobRef.from_body(job_body()), spec, builders.UnitPlan(unit="baseline"), config)
    assert baseline["spec"]["serviceAccountName"] == "digits-runner"
