"""Weight-only quantization (approach weight_only, ORT MatMulNBits) end to end on a real model: the wide MLP of
wide_model.py (digits, 256-wide layers), where 4 bits break exactly two layers and 8 bits do not."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from wide_model import build_wide_mlp

from qtune.adaptors.onnxrt import OnnxRuntimeAdaptor
from qtune.data import Dataset
from qtune.local import tune
from qtune.spec import load_job
from qtune.spec.errors import DataError
from qtune.spec.models import QuantizationSpec
from qtune.tuning import codec
from qtune.tuning.space import build_space


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, list[str]]:
    return build_wide_mlp(tmp_path_factory.mktemp("wide"))


def _adaptor(tmp_path: Path) -> OnnxRuntimeAdaptor:
    return OnnxRuntimeAdaptor({"workspace": str(tmp_path / "ws"), "quantization": {"approach": "weight_only"}})


def _op_of_weight(adaptor: OnnxRuntimeAdaptor, model: Path, weight: str) -> str:
    from qtune.adaptors.onnxrt.graph import GraphView

    view = GraphView(adaptor.optimized(model).model.graph_only())
    return next(node.name for node in view.nodes if weight in node.input)


def _accuracy(path: Path, evaluation: Path) -> float:
    import onnxruntime as ort

    data = np.load(evaluation)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return float((session.run(None, {"input": data["input"]})[0].argmax(1) == data["labels"]).mean())


def test_mixed_bits_per_layer_reach_matmulnbits_with_their_settings(wide, tmp_path: Path) -> None:
    model, _, evaluation, hostile = wide
    adaptor = _adaptor(tmp_path)
    space = build_space(adaptor.query_fw_capability(model), QuantizationSpec(approach="weight_only"), [], 100)
    config = space.default_config()
    assert len(config.quantized_ops()) == 5  # every layer, the 2-D Gemms (MatMul + Add fused by ORT) included
    wider = {name: replace(config.ops[name], weight=replace(config.ops[name].weight, dtype="int8"))
             for name in (_op_of_weight(adaptor, model, w) for w in hostile)}
    mixed = config.with_ops(wider)
    first = next(n for n in config.ops if n not in wider)
    mixed = mixed.with_ops({first: mixed.ops[first].as_fp32()})
    quantized = adaptor.quantize(codec.dump(mixed), model, None)
    nodes = onnx.load(str(quantized.path)).graph.node
    bits = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            for n in nodes if n.op_type == "MatMulNBits"}
    assert sorted(b["bits"] for b in bits.values()) == [4, 4, 8, 8]
    assert all(b["block_size"] == 32 and b["accuracy_level"] == 4 for b in bits.values())
    assert [n.name for n in nodes if n.op_type == "Gemm"] == [first]  # the fp32 layer is left as it was
    assert _accuracy(quantized.path, evaluation) >= 0.97
    everywhere = adaptor.quantize(codec.dump(config), model, None)
    assert _accuracy(everywhere.path, evaluation) < 0.5  # int4 everywhere breaks the hostile layers


def test_sensitivity_ranks_the_hostile_layers_first(wide, tmp_path: Path) -> None:
    model, calib, _, hostile = wide
    adaptor = _adaptor(tmp_path)
    space = build_space(adaptor.query_fw_capability(model), QuantizationSpec(approach="weight_only"), [], 100)
    arrays = np.load(calib)
    dataset = Dataset({"input": arrays["input"]}, arrays["labels"])
    scores = adaptor.op_sensitivity(model, codec.dump(space.default_config()), dataset)
    ranked = sorted(scores, key=lambda name: -scores[name])
    assert set(ranked[:2]) == {_op_of_weight(adaptor, model, w) for w in hostile}, scores


def _job(folder: Path, wide, strategy: str, algorithms: list[str] | None = None) -> Path:
    model, calib, evaluation, _ = wide
    spec = {
        "apiVersion": "qtune.io/v1alpha1", "kind": "QuantizationJob", "metadata": {"name": "wide"},
        "spec": {
            "model": {"framework": "onnxruntime", "path": str(model)},
            "data": {"calibration": {"path": str(calib), "samples": 64},
                     "evaluation": {"path": str(evaluation), "metric": "top1"}},
            "quantization": {"approach": "weight_only",
                             **({"modelWise": {"weight": {"algorithm": algorithms}}} if algorithms else {})},
            "tuning": {"strategy": strategy, "accuracyCriterion": {"relative": 0.01}, "objective": "size",
                       "maxTrials": 12, "seed": 0},
            "benchmark": {"batchSizes": [1], "warmupRuns": 2, "runs": 5},
            "output": {"path": str(folder / "out")},
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("strategy", ["mixed_bits", "basic"])
def test_tune_weight_only_moves_the_sensitive_layers_to_8_bits(wide, tmp_path: Path, strategy: str) -> None:
    job_file = _job(tmp_path, wide, strategy, algorithms=["rtn"])  # round to nearest only: no algorithm rung
    outcome = tune(load_job(job_file), job_file)
    assert outcome.best is not None, codec.dump(outcome.history)
    assert outcome.best.accuracy >= outcome.baseline.accuracy * 0.99
    ops = outcome.best.tune_config.ops
    above_4 = {name for name, op in ops.items() if op.weight is not None and op.weight.dtype != "int4"}
    hostile = {_op_of_weight(_adaptor(tmp_path / "probe"), wide[0], weight) for weight in wide[3]}
    assert above_4 == hostile, {name: op.weight for name, op in ops.items()}
    assert len(outcome.history.trials) <= 6  # level 0 fails, level 1 fails, level 2 passes
    saved = next((tmp_path / "out" / "model").glob("*.onnx"))
    nodes = onnx.load(str(saved)).graph.node
    assert sum(n.op_type == "MatMulNBits" for n in nodes) == 5


def test_profile_attributes_matmulnbits_to_its_op(wide, tmp_path: Path) -> None:
    model, calib, _, _ = wide
    adaptor = _adaptor(tmp_path)
    space = build_space(adaptor.query_fw_capability(model), QuantizationSpec(approach="weight_only"), [], 100)
    inputs = {"input": np.load(calib)["input"][:16]}
    shares = adaptor.op_time_shares(model, codec.dump(space.default_config()), None, inputs, threads=1)
    assert set(space.ops) <= set(shares["int8"]), shares  # MatMulNBits <op>_Q4 counted for <op>, not "(other)"
    assert all(shares["int8"][name] > 0 for name in space.ops)


def test_sensitivity_is_the_model_output_error_with_that_layer_alone_quantized(wide, tmp_path: Path) -> None:
    import onnxruntime as ort

    model, calib, _, _ = wide
    adaptor = _adaptor(tmp_path)
    space = build_space(adaptor.query_fw_capability(model), QuantizationSpec(approach="weight_only"), [], 100)
    config = space.default_config()
    arrays = np.load(calib)
    scores = adaptor.op_sensitivity(model, codec.dump(config), Dataset({"input": arrays["input"]}, arrays["labels"]))
    layer = next(iter(space.ops))
    alone = config.with_fallback([name for name in space.ops if name != layer])
    feed = {"input": arrays["input"][:8]}

    def logits(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, feed)[0].astype(np.float64)

    reference = logits(adaptor.optimized(model).model.path)
    diff = logits(adaptor.quantize(codec.dump(alone), model, None).path) - reference
    assert scores[layer] == pytest.approx(float(np.sum(diff * diff) / np.sum(reference * reference)), rel=1e-3)


def _bits_nodes(path: Path) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"}


def test_gptq_and_k_quant_lower_the_error_of_a_fragile_layer_on_real_data(wide, tmp_path: Path) -> None:
    """One hostile layer alone at int4 (the rest fp32): the model's output error on the held-out digits with each
    algorithm. GPTQ sees from the calibration data that the outlier rows multiply inputs that are always 0, and
    k-quant's weighted search gives the outlier less say than round to nearest's min/max."""
    import onnxruntime as ort

    model, calib, evaluation, hostile = wide
    adaptor = _adaptor(tmp_path)
    space = build_space(adaptor.query_fw_capability(model), QuantizationSpec(approach="weight_only"), [], 100)
    layer = _op_of_weight(adaptor, model, hostile[0])
    alone = space.default_config().with_fallback([name for name in space.ops if name != layer])
    arrays = np.load(calib)
    loader = Dataset({"input": arrays["input"]}, arrays["labels"]).loader(32)
    inputs = {"input": np.load(evaluation)["input"]}

    def output(path: Path) -> np.ndarray:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)[0].astype(float)

    reference = output(adaptor.optimized(model).model.path)
    errors, nodes = {}, {}
    for algorithm in ("rtn", "k_quant", "gptq"):
        op = alone.ops[layer]
        config = alone.with_ops({layer: replace(op, weight=replace(op.weight, algorithm=algorithm))})
        quantized = adaptor.quantize(codec.dump(config), model, loader)
        assert adaptor.last_quantization["weight_only_passes"] == {
            {"rtn": "", "k_quant": "k_quant-", "gptq": "gptq-"}[algorithm] + f"bits4-block32-"
            f"{'asym' if algorithm == 'k_quant' else 'sym'}-level4": [layer]}
        diff = output(quantized.path) - reference
        errors[algorithm] = float(np.sum(diff * diff) / np.sum(reference * reference))
        (node,) = _bits_nodes(quantized.path).values()
        nodes[algorithm] = node
    assert errors["rtn"] > 0.5, errors  # round to nearest breaks the layer
    assert errors["gptq"] < errors["rtn"] / 100 and errors["k_quant"] < errors["rtn"] / 5, errors
    for algorithm, node in nodes.items():  # the same MatMulNBits settings whatever the algorithm
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert (attributes["bits"], attributes["block_size"], attributes["accuracy_level"]) == (4, 32, 4), algorithm
    assert len(nodes["k_quant"].input) == 4 and len(nodes["gptq"].input) == 3  # k-quant writes zero points
    with pytest.raises(DataError, match="calibration data yielded no samples"):  # gptq without data
        adaptor.quantize(codec.dump(alone.with_ops({layer: replace(alone.ops[layer], weight=replace(
            alone.ops[layer].weight, algorithm="gptq", granularity="per_block_128"))})), model, None)


def test_tune_weight_only_takes_the_gptq_rung_before_8_bits(wide, tmp_path: Path) -> None:
    """With gptq as the rung (k_quant, the default rung, not allowed) the fragile layers hold at int4."""
    job_file = _job(tmp_path, wide, "mixed_bits", algorithms=["rtn", "gptq"])
    outcome = tune(load_job(job_file), job_file)
    assert outcome.best is not None, codec.dump(outcome.history)
    assert outcome.best.accuracy >= outcome.baseline.accuracy * 0.99
    ops = outcome.best.tune_config.ops
    assert all(op.weight.dtype == "int4" and op.weight.algorithm == "gptq" for op in ops.values()), ops
    assert len(outcome.history.trials) <= 3  # level 0 (round to nearest) fails, level 1 (gptq everywhere) passes
    saved = next((tmp_path / "out" / "model").glob("*.onnx"))
    assert len(_bits_nodes(saved)) == 5


def test_sensitivity_of_a_gptq_default_fits_gptq_to_the_sensitivity_samples(wide, tmp_path: Path) -> None:
    """A job restricted to gptq: each layer alone quantized by GPTQ on the sensitivity samples (whole-model runs),
    not the layer-local round-to-nearest fallback, which would rank the fragile layers far above the rest."""
    model, calib, _, _ = wide
    adaptor = _adaptor(tmp_path)
    quantization = QuantizationSpec(approach="weight_only", model_wise={"weight": {"algorithm": ["gptq"]}})
    space = build_space(adaptor.query_fw_capability(model), quantization, [], 100)
    arrays = np.load(calib)
    scores = adaptor.op_sensitivity(model, codec.dump(space.default_config()),
                                    Dataset({"input": arrays["input"]}, arrays["labels"]))
    assert set(scores) == set(space.ops) and max(scores.values()) < 0.01, scores
