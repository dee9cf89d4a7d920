"""The committed CRDs equal the generated ones, and the QuantizationJob schema is structural."""

from __future__ import annotations

import copy
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from qtune.operator import crd
from qtune.spec import models
from qtune.spec.models import JobSpec

ROOT = Path(__file__).resolve().parents[2]
REGENERATE = "regenerate with: python -m qtune.operator.crd > crds/quantizationjob.yaml"


def test_committed_crd_is_generated() -> None:
    committed = (ROOT / "crds" / "quantizationjob.yaml").read_text()
    assert committed == crd.render(), REGENERATE


def test_committed_peering_crds_are_generated() -> None:
    committed = (ROOT / "crds" / "kopf-peering.yaml").read_text()
    assert committed == crd.render(peering=True), "python -m qtune.operator.crd --peering > crds/kopf-peering.yaml"


def _schema() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "crds" / "quantizationjob.yaml").read_text())
    return document["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


FORBIDDEN = {"$ref", "$defs", "oneOf", "allOf", "title", "const", "nullable"}
JUNCTORS = ("anyOf", "not")
"""Allowed for value validation only (Kubernetes' structural rule): inside them no type, properties,
description, default, additionalProperties or nullable, and only on an untyped preserved leaf."""
STRUCTURAL_KEYS = {"type", "properties", "additionalProperties", "description", "default", "nullable",
                   "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string"}


def _junctor_branches(node: dict[str, Any]) -> list[dict[str, Any]]:
    branches = list(node.get("anyOf") or [])
    if "not" in node:
        branches.append(node["not"])
    out = []
    for branch in branches:
        out.append(branch)
        if isinstance(branch.get("items"), dict):
            out.append(branch["items"])
    return out


def _nodes(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for name, sub in (node.get("properties") or {}).items():
        out += _nodes(sub, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        out += _nodes(node["additionalProperties"], f"{path}.*")
    if isinstance(node.get("items"), dict):
        out += _nodes(node["items"], f"{path}[]")
    return out


def test_schema_is_structural() -> None:
    for path, node in _nodes(_schema()):
        assert not FORBIDDEN & node.keys(), f"{path}: {FORBIDDEN & node.keys()}"
        if any(j in node for j in JUNCTORS):
            assert node.get("x-kubernetes-preserve-unknown-fields") and "type" not in node, path
            for branch in _junctor_branches(node):
                assert not STRUCTURAL_KEYS & branch.keys(), f"{path}: {STRUCTURAL_KEYS & branch.keys()} in a junctor"
        typed = ("type" in node or node.get("x-kubernetes-int-or-string")
                 or node.get("x-kubernetes-preserve-unknown-fields"))
        assert typed, f"{path}: no type"
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("additionalProperties") is not False, path
        if isinstance(node.get("exclusiveMinimum"), int | float) and not isinstance(node["exclusiveMinimum"], bool):
            pytest.fail(f"{path}: exclusiveMinimum must be boolean in OpenAPI v3.0")
        if isinstance(node.get("exclusiveMaximum"), int | float) and not isinstance(node["exclusiveMaximum"], bool):
            pytest.fail(f"{path}: exclusiveMaximum must be boolean in OpenAPI v3.0")
        if node.get("type") == "array":
            assert "items" in node, path
        for rule in node.get("x-kubernetes-validations", []):
            assert rule.get("message") or rule.get("messageExpression"), f"{path}: a rule without a message"


def _camel_fields(cls: type[BaseModel]) -> set[str]:
    return {field.alias or name for name, field in cls.model_fields.items()}


@pytest.mark.parametrize("path,cls", [
    ("spec", models.JobSpec), ("spec.model", models.ModelSpec), ("spec.data.calibration", models.CalibrationSpec),
    ("spec.data.evaluation", models.EvaluationSpec), ("spec.quantization", models.QuantizationSpec),
    ("spec.quantization.modelWise", models.OpConstraint),
    ("spec.quantization.modelWise.activation", models.TensorConstraint),
    ("spec.tuning", models.TuningSpec), ("spec.tuning.accuracyCriterion", models.AccuracyCriterion),
    ("spec.benchmark", models.BenchmarkSpec), ("spec.trial", models.TrialSpec),
    ("spec.trial.resources", models.ResourcesSpec), ("spec.workspace", models.WorkspaceSpec),
])
def test_every_model_field_is_in_the_schema(path: str, cls: type[BaseModel]) -> None:
    node = _schema()
    for part in path.split("."):
        node = node["properties"][part]
    assert set(node["properties"]) == _camel_fields(cls)


def test_enums_and_bounds_come_from_the_models() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    tuning = spec["tuning"]["properties"]
    assert tuning["objective"]["enum"] == list(models.OBJECTIVES)
    assert {k: v for k, v in tuning["maxTrials"].items() if k != "description"} == {
        "type": "integer", "minimum": 1, "maximum": 10000, "default": 50}
    assert tuning["parallelTrials"]["maximum"] == 256
    relative = tuning["accuracyCriterion"]["properties"]["relative"]
    assert {k: v for k, v in relative.items() if k != "description"} == {
        "type": "number", "minimum": 0, "maximum": 1, "exclusiveMaximum": True}
    assert spec["benchmark"]["properties"]["batchSizes"]["items"] == {"type": "integer", "minimum": 1}
    assert "default" not in relative  # defaulting relative would clash with a given absolute
    dtype = spec["quantization"]["properties"]["opWise"]["additionalProperties"]["properties"]["activation"]
    # one value or a list (`dtype: fp32`, as `qtune tune` takes it): value validations of a preserved leaf
    one, many = dtype["properties"]["dtype"]["anyOf"]
    assert one["enum"] == many["items"]["enum"] == list(models.DTYPES)
    assert dtype["properties"]["reduceRange"]["anyOf"][0]["enum"] == [True, False]
    assert spec["trial"]["properties"]["nodeAffinity"]["x-kubernetes-preserve-unknown-fields"] is True
    assert spec["trial"]["properties"]["resources"]["properties"]["cpu"]["x-kubernetes-int-or-string"] is True
    assert spec["model"]["properties"]["inputs"]["items"]["properties"]["shape"]["items"] == {
        "x-kubernetes-int-or-string": True}


def test_cross_field_rules_are_present() -> None:
    spec = _schema()["properties"]["spec"]["properties"]
    rules = lambda node: " ".join(r["rule"] for r in node.get("x-kubernetes-validations", []))  # noqa: E731
    assert "self == oldSelf" in rules(spec["model"])
    assert "self == oldSelf" in rules(spec["data"])
    assert "has(self.relative) && has(self.absolute)" in rules(spec["tuning"]["properties"]["accuracyCriterion"])
    assert "self.parallelTrials <= self.maxTrials" in rules(spec["tuning"])
    assert "'basic'" in rules(spec["tuning"]["properties"]["strategy"])


def _apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """What the API server's structural defaulting does (nested defaults included)."""
    if not isinstance(value, dict) or "properties" not in schema:
        if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
            return {k: _apply_defaults(schema["additionalProperties"], v) for k, v in value.items()}
        return value
    out = dict(value)
    for name, sub in schema["properties"].items():
        if name not in out and "default" in sub:
            out[name] = copy.deepcopy(sub["default"])
        if name in out:
            out[name] = _apply_defaults(sub, out[name])
    return out


def test_schema_defaults_equal_the_model_defaults() -> None:
    minimal = {"model": {"framework": "onnxruntime", "path": "m.onnx"},
               "data": {"calibration": {"path": "c.npz"}, "evaluation": {"path": "e.npz"}}}
    defaulted = _apply_defaults(_schema()["properties"]["spec"], minimal)
    assert defaulted["tuning"]["maxTrials"] == 50
    assert defaulted["benchmark"]["batchSizes"] == [1, 32]
    assert JobSpec.model_validate(defaulted) == JobSpec.model_validate(minimal)


@pytest.mark.parametrize("metric", ["perplexity", "mse", "top1"])
def test_the_schema_leaves_the_direction_to_the_metric(metric: str) -> None:
    """No default for accuracyCriterion.higherIsBetter: the API server would write `true` into a perplexity job,
    which the spec then refuses as contradicting its metric (InvalidSpec on the cluster)."""
    minimal = {"model": {"framework": "onnxruntime", "path": "m.onnx"},
               "data": {"calibration": {"path": "c.npz"}, "evaluation": {"path": "e.npz", "metric": metric}}}
    defaulted = _apply_defaults(_schema()["properties"]["spec"], minimal)
    assert "higherIsBetter" not in defaulted["tuning"]["accuracyCriterion"]
    spec = JobSpec.model_validate(defaulted)
    assert spec == JobSpec.model_validate(minimal)
    assert spec.tuning.accuracy_criterion.higher_is_better is (metric == "top1")


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (`X | None` included), None for a plain value."""
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def test_extras_name_existing_fields() -> None:
    schema = crd.spec_schema()
    for path, extra in crd.EXTRAS.items():
        model: type[BaseModel] | None = JobSpec
        node = schema
        for part in path.split("."):
            assert model is not None, f"EXTRAS[{path!r}]: {part!r} is below a plain value"
            fields = {field.alias or name: field for name, field in model.model_fields.items()}
            assert part in fields, f"EXTRAS[{path!r}]: {model.__name__} has no field {part!r}"
            model = _model_of(fields[part].annotation)
            node = node["properties"][part]
        assert "type" in node, f"EXTRAS[{path!r}] names no generated schema node"
        for key, value in extra.items():
            if key == "x-kubernetes-validations":
                assert all(rule in node[key] for rule in value), f"EXTRAS[{path!r}]: rules not applied"
            else:
                assert node[key] == value, f"EXTRAS[{path!r}]: {key} not applied"


def test_printer_columns() -> None:
    document = yaml.safe_load((ROOT / "crds" / "quantizationjob.yaml").read_text())
    version = document["spec"]["versions"][0]
    names = [col["name"] for col in version["additionalPrinterColumns"]]
    assert names[:4] == ["State", "Trials", "Best-Accuracy", "Speedup"] and names[-1] == "Age"
    assert version["additionalPrinterColumns"][3]["jsonPath"] == ".status.best.speedupInterval"
    assert version["subresources"] == {"status": {}}
    assert document["spec"]["names"]["shortNames"] == ["qj"]
    assert document["spec"]["scope"] == "Namespaced"


def test_status_schema_is_generated_from_the_status_model() -> None:
    from qtune.operator.status import JobStatus

    status = _schema()["properties"]["status"]
    assert not status.get("x-kubernetes-preserve-unknown-fields")
    assert set(status["properties"]) == set(JobStatus.model_json_schema(by_alias=True)["properties"])
    free = [path for path, node in _nodes(status, "status") if node.get("x-kubernetes-preserve-unknown-fields")]
    assert free == ["status.best.tuneConfig.extras"]  # adaptor options only
    conditions = status["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["items"]["required"] == ["type", "status"]
    speed = status["properties"]["best"]["properties"]["speed"]["properties"]
    assert {"speedup", "low", "high", "latencyMs", "fp32LatencyMs"} <= set(speed)
