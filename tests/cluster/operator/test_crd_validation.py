"""The API server enforces the CRD schema: invalid jobs are rejected with messages a person can act on."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import opcluster
import pytest
from kubernetes import client


def _create(cluster: Any, namespace: str, manifest: dict[str, Any], dry_run: bool = True) -> dict[str, Any]:
    return opcluster.custom(cluster).create_namespaced_custom_object(
        opcluster.GROUP, opcluster.VERSION, namespace, opcluster.PLURAL, manifest,
        dry_run="All" if dry_run else None)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(spec: dict[str, Any]) -> None:
        node = spec
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return apply


INVALID = {
    "wrong type": (_set("tuning.maxTrials", "many"), ["spec.tuning.maxTrials", "must be of type integer"]),
    "both criteria": (_set("tuning.accuracyCriterion", {"relative": 0.01, "absolute": 0.02}),
                      ["spec.tuning.accuracyCriterion", "only one of relative or absolute"]),
    "parallel > max": (_set("tuning.parallelTrials", 8),
                       ["spec.tuning.parallelTrials", "must not exceed maxTrials"]),
    "unknown strategy": (_set("tuning.strategy", "bayesianx"),
                         ["spec.tuning.strategy", 'unknown strategy "bayesianx"', "basic, exhaustive, random"]),
    "unknown objective": (_set("tuning.objective", "speed"),
                          ["spec.tuning.objective", "Unsupported value", '"latency", "size"']),
    "relative out of range": (_set("tuning.accuracyCriterion.relative", 1.5),
                              ["spec.tuning.accuracyCriterion.relative", "less than 1"]),
    "fractional cpu": (_set("trial.resources.cpu", "1.5"), ["spec.trial.resources.cpu", "whole number of CPUs"]),
    "bad memory": (_set("trial.resources.memory", "lots"), ["spec.trial.resources.memory"]),
    "no model file": (lambda spec: spec["model"].pop("path"), ["spec.model", "model.path"]),
    "negative batch size": (_set("benchmark.batchSizes", [1, -8]),
                            ["spec.benchmark.batchSizes[1]", "greater than or equal to 1"]),
    # constraint fields take one value or a list (`dtype: fp32`); a wrong value is refused in either form
    "unknown dtype": (_set("quantization.opWise", {"/fc2/Gemm": {"activation": {"dtype": "fp16"}}}),
                      ["spec.quantization.opWise./fc2/Gemm.activation.dtype", 'Unsupported value: "fp16"',
                       '"int8", "uint8", "int4", "fp32"']),
    "unknown dtype in a list": (_set("quantization.opTypeWise", {"MatMul": {"weight": {"dtype": ["int8", "fp16"]}}}),
                                ["spec.quantization.opTypeWise.MatMul.weight.dtype[1]", 'Unsupported value: "fp16"']),
    "dtype of a wrong type": (_set("quantization.modelWise", {"activation": {"dtype": 8}}),
                              ["spec.quantization.modelWise.activation.dtype", "Unsupported value: 8"]),
    "dtype as an object": (_set("quantization.modelWise", {"weight": {"scheme": {"sym": True}}}),
                           ["spec.quantization.modelWise.weight.scheme", "Unsupported value"]),
    "reduceRange not a bool": (_set("quantization.modelWise", {"weight": {"reduceRange": "maybe"}}),
                               ["spec.quantization.modelWise.weight.reduceRange", 'Unsupported value: "maybe"']),
    "unknown approach": (_set("quantization.opWise", {"/fc1/Gemm": {"approach": ["static", "qat"]}}),
                         ["spec.quantization.opWise./fc1/Gemm.approach[1]", 'Unsupported value: "qat"']),
    # SmoothQuant (issue 22): alpha in (0, 1] or auto, static int8 only
    "smoothQuant alpha too big": (_set("quantization.smoothQuant", {"alpha": 2}),
                                  ["spec.quantization.smoothQuant.alpha"]),
    "smoothQuant alpha word": (_set("quantization.smoothQuant", {"alpha": "fast"}),
                               ["spec.quantization.smoothQuant.alpha"]),
    "smoothQuant dynamic": (lambda spec: spec["quantization"].update(approach="dynamic", smoothQuant={"alpha": 0.5}),
                            ["spec.quantization.smoothQuant", "static int8"]),
    # evaluation: data, or an evalFunc that loads its own (rules beside EvaluationSpec's validator)
    "evalFunc and metric": (_set("data.evaluation", {"evalFunc": "mymod:score", "metric": "top1"}),
                            ["spec.data.evaluation", "either metric or evalFunc"]),
    "evaluation without data": (_set("data.evaluation", {"metric": "top1"}),
                                ["spec.data.evaluation", "exactly one of path"]),
    "bad evalFunc form": (_set("data.evaluation", {"evalFunc": "not an entrypoint"}),
                          ["spec.data.evaluation.evalFunc"]),
    # a LocalQueue name is a label value on every unit pod (issue 21)
    "queue name no label": (_set("trial.queueName", "Team_A"), ["spec.trial.queueName"]),
}

VALID = {
    "kueue queue": _set("trial.queueName", "team-a.tuning"),
    "smoothQuant alpha": _set("quantization.smoothQuant", {"alpha": 0.85}),
    "smoothQuant auto": _set("quantization.smoothQuant", {"alpha": "auto"}),
    "evalFunc without data": _set("data.evaluation", {"evalFunc": "mymod:score"}),
    # README's tour writes the scalar form; `qtune tune` and the API server both take it, and the list form
    "scalar dtype (README)": _set("quantization.opWise", {"/fc2/Gemm": {"activation": {"dtype": "fp32"}}}),
    "list dtype": _set("quantization.opWise", {"/fc2/Gemm": {"activation": {"dtype": ["fp32", "int8"]}}}),
    "scalars everywhere": _set("quantization.modelWise", {
        "activation": {"dtype": "uint8", "scheme": "asym", "algorithm": "kl", "reduceRange": False},
        "weight": {"dtype": "int8", "granularity": "per_channel", "reduceRange": True}, "approach": "static"}),
    "lists everywhere": _set("quantization.opTypeWise", {"Conv": {
        "activation": {"dtype": ["int8", "uint8"], "scheme": ["sym", "asym"], "algorithm": ["minmax", "percentile"],
                       "reduceRange": [True, False]},
        "weight": {"granularity": ["per_tensor", "per_channel"]}, "approach": ["static", "dynamic"]}}),
}


def test_image_and_workspace_claim_are_immutable(cluster: Any, crds: None, op_namespace: str) -> None:
    """Issue 20: the image and the workspace PVC the operator admitted cannot be edited, nor set when they were
    unset (the transition rules sit on spec.trial and spec.workspace, which the API server defaults to {})."""
    manifest = opcluster.job_manifest("pinned-image")
    manifest["spec"]["trial"]["image"] = "qtune:0.1.0"
    _create(cluster, op_namespace, manifest, dry_run=False)
    _create(cluster, op_namespace, opcluster.job_manifest("unset-image"), dry_run=False)
    api = opcluster.custom(cluster)

    def patch(name: str, body: dict[str, Any]) -> dict[str, Any]:
        return api.patch_namespaced_custom_object(opcluster.GROUP, opcluster.VERSION, op_namespace, opcluster.PLURAL,
                                                  name, body)

    for name, body, field in (
            ("pinned-image", {"spec": {"trial": {"image": "attacker.example/miner:1"}}}, "spec.trial.image"),
            ("pinned-image", {"spec": {"trial": {"image": None}}}, "spec.trial.image"),
            ("unset-image", {"spec": {"trial": {"image": "attacker.example/miner:1"}}}, "spec.trial.image"),
            ("pinned-image", {"spec": {"workspace": {"persistentVolumeClaim": "other"}}},
             "spec.workspace.persistentVolumeClaim"),
            ("pinned-image", {"spec": {"workspace": {"persistentVolumeClaim": None}}},
             "spec.workspace.persistentVolumeClaim")):
        with pytest.raises(client.ApiException) as info:
            patch(name, body)
        message = json.loads(info.value.body)["message"]
        assert info.value.status == 422 and f"{field} is immutable" in message, (name, body, message)
    # the rest of spec.trial and spec.workspace may change; an unchanged image is no edit
    patch("pinned-image", {"spec": {"trial": {"image": "qtune:0.1.0", "resources": {"memory": "3Gi"}},
                                    "workspace": {"trialModels": "keep-all"}}})
    patch("unset-image", {"spec": {"trial": {"resources": {"memory": "3Gi"}}}})


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_jobs_are_rejected(cluster: Any, crds: None, op_namespace: str, case: str) -> None:
    mutate, expected = INVALID[case]
    manifest = opcluster.job_manifest("bad-job")
    mutate(manifest["spec"])
    with pytest.raises(client.ApiException) as info:
        _create(cluster, op_namespace, manifest)
    assert info.value.status == 422, info.value.body
    message = json.loads(info.value.body)["message"]
    for text in expected:
        assert text in message, f"{text!r} not in {message}"


def test_unknown_fields_are_rejected(cluster: Any, crds: None, op_namespace: str) -> None:
    manifest = opcluster.job_manifest("typo")
    manifest["spec"]["tuning"]["maxTrails"] = 3
    api = opcluster.custom(cluster)
    with pytest.raises(client.ApiException) as info:
        api.create_namespaced_custom_object(opcluster.GROUP, opcluster.VERSION, op_namespace, opcluster.PLURAL,
                                           manifest, field_validation="Strict")
    assert "maxTrails" in info.value.body


def test_valid_jobs_are_accepted_and_defaulted(cluster: Any, crds: None, op_namespace: str) -> None:
    manifest = opcluster.job_manifest("custom-strategy", strategy="mypkg.search:MyStrategy")
    manifest["spec"]["trial"]["resources"]["cpu"] = "2"
    created = _create(cluster, op_namespace, copy.deepcopy(manifest))
    spec = created["spec"]
    assert spec["tuning"]["strategy"] == "mypkg.search:MyStrategy"
    assert spec["tuning"]["trialTimeoutSeconds"] == 1800          # schema defaults applied
    assert spec["workspace"]["mountPath"] == "/workspace"
    assert spec["quantization"]["keepNonFiniteFp32"] is True


def test_model_and_data_are_immutable(cluster: Any, crds: None, op_namespace: str) -> None:
    _create(cluster, op_namespace, opcluster.job_manifest("immutable"), dry_run=False)
    api = opcluster.custom(cluster)
    for patch, field in (({"spec": {"model": {"path": "other.onnx"}}}, "spec.model"),
                         ({"spec": {"data": {"calibration": {"samples": 7}}}}, "spec.data")):
        with pytest.raises(client.ApiException) as info:
            api.patch_namespaced_custom_object(opcluster.GROUP, opcluster.VERSION, op_namespace, opcluster.PLURAL,
                                               "immutable", patch)
        assert info.value.status == 422 and f"{field} is immutable" in json.loads(info.value.body)["message"]
    # other fields may change (e.g. raising maxTrials)
    api.patch_namespaced_custom_object(opcluster.GROUP, opcluster.VERSION, op_namespace, opcluster.PLURAL,
                                       "immutable", {"spec": {"tuning": {"maxTrials": 9}}})


@pytest.mark.parametrize("case", list(INVALID))
def test_pydantic_rejects_the_same_specs(case: str) -> None:
    """Parity: every spec the API server rejects, the local mode (pydantic) rejects too."""
    from qtune.spec.errors import SpecError
    from qtune.spec.load import job_from_dict

    mutate, _ = INVALID[case]
    manifest = opcluster.job_manifest("bad-job")
    mutate(manifest["spec"])
    with pytest.raises(SpecError):
        job_from_dict(manifest)


@pytest.mark.parametrize("case", list(VALID))
def test_both_accept_the_same_valid_specs(cluster: Any, crds: None, op_namespace: str, case: str) -> None:
    """Parity the other way: a spec `qtune tune` takes, the API server takes too, and stores it as written
    (the operator hands it to the runner, whose pydantic reads it as `qtune tune` does)."""
    from qtune.spec.load import job_from_dict

    manifest = opcluster.job_manifest("good-job")
    VALID[case](manifest["spec"])
    local = job_from_dict(copy.deepcopy(manifest))
    created = _create(cluster, op_namespace, copy.deepcopy(manifest))
    assert created["spec"]["quantization"] | manifest["spec"]["quantization"] == created["spec"]["quantization"]
    assert job_from_dict({**manifest, "spec": created["spec"]}).spec.quantization == local.spec.quantization
