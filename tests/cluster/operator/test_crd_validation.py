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
}


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
