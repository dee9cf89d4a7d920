"""The job spec: defaults, and errors that name the field and what is allowed."""

from pathlib import Path

import pytest

from qtune.spec import SpecError, job_from_dict, load_job


def job(**spec_overrides):
    spec = {
        "model": {"framework": "onnxruntime", "path": "model.onnx"},
        "data": {"calibration": {"path": "calib.npz"}, "evaluation": {"path": "eval.npz"}},
    }
    spec.update(spec_overrides)
    return {"apiVersion": "qtune.io/v1alpha1", "kind": "QuantizationJob", "metadata": {"name": "j"}, "spec": spec}


def error_of(document) -> str:
    with pytest.raises(SpecError) as caught:
        job_from_dict(document)
    return str(caught.value)


def test_defaults():
    parsed = job_from_dict(job())
    assert parsed.spec.tuning.strategy == "basic"
    assert parsed.spec.tuning.accuracy_criterion.relative == 0.01
    assert parsed.spec.tuning.accuracy_criterion.higher_is_better is True
    assert parsed.spec.quantization.approach == "static"
    assert parsed.spec.quantization.format == "QDQ"
    assert parsed.spec.benchmark.batch_sizes == [1, 32]


def test_constraints_accept_one_value_or_a_list():
    parsed = job_from_dict(job(quantization={"opTypeWise": {"Conv": {"weight": {"granularity": "per_tensor"}}},
                                             "opWise": {"fc": {"activation": {"dtype": ["fp32"]}}}}))
    assert parsed.spec.quantization.op_type_wise["Conv"].weight.granularity == ["per_tensor"]
    assert parsed.spec.quantization.op_wise["fc"].activation.dtype == ["fp32"]


@pytest.mark.parametrize(("spec", "field", "words"), [
    ({"tuning": {"strategy": "greedy"}}, "spec.tuning.strategy", "allowed: basic, exhaustive, random"),
    ({"tuning": {"maxTrials": 0}}, "spec.tuning.maxTrials", "greater than or equal to 1"),
    ({"tuning": {"maxTrials": "many"}}, "spec.tuning.maxTrials", "integer"),
    ({"tuning": {"maxTrials": 2, "parallelTrials": 3}}, "spec.tuning", "must not exceed maxTrials"),
    ({"tuning": {"accuracyCriterion": {"relative": 0.01, "absolute": 0.02}}}, "spec.tuning.accuracyCriterion",
     "only one of relative or absolute"),
    ({"tuning": {"objective": "speed"}}, "spec.tuning.objective", "'latency' or 'size'"),
    ({"tuning": {"maxTrails": 5}}, "spec.tuning.maxTrails", "unknown field"),
    ({"quantization": {"approach": "qat"}}, "spec.quantization.approach",
     "'static', 'dynamic', 'auto' or 'weight_only'"),
    ({"quantization": {"modelWise": {"weight": {"dtype": "int2"}}}}, "spec.quantization.modelWise.weight.dtype[0]",
     "'int8', 'uint8', 'int4' or 'fp32'"),
    ({"data": {"calibration": {"path": "c.npz", "entrypoint": "m:f"}, "evaluation": {"path": "e.npz"}}},
     "spec.data.calibration", "exactly one of path"),
    ({"data": {"calibration": {"path": "c.npz"}, "evaluation": {"path": "e.npz", "metric": "auc"}}},
     "spec.data.evaluation.metric", "'top1', 'topk', 'f1', 'mse', 'cosine' or 'perplexity'"),
    ({"trial": {"resources": {"memory": "lots"}}}, "spec.trial.resources.memory", "Kubernetes memory quantity"),
])
def test_errors_name_the_field_and_what_is_allowed(spec, field, words):
    message = error_of(job(**spec))
    assert message.startswith(field + ":"), message
    assert words in message
    assert "\n" not in message


def test_missing_model_and_bad_name():
    document = job()
    del document["spec"]["model"]
    assert error_of(document) == "spec.model: required field is missing"
    document = job()
    document["metadata"]["name"] = "Bad_Name"
    assert error_of(document).startswith("metadata.name: 'Bad_Name' is not a valid name")


def test_load_job_reports_malformed_yaml_with_its_line(tmp_path: Path):
    path = tmp_path / "job.yaml"
    path.write_text("apiVersion: qtune.io/v1alpha1\nkind: QuantizationJob\nspec: [unclosed\n")
    with pytest.raises(SpecError) as caught:
        load_job(path)
    assert "malformed YAML at line" in str(caught.value)
    with pytest.raises(SpecError, match="job file not found"):
        load_job(tmp_path / "missing.yaml")
