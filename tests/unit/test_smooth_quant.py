"""SmoothQuant on the ONNX graph (qtune/adaptors/onnxrt/smooth_quant.py): exact on fp32, folded where exact."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from qtune.adaptors.onnxrt import smooth_quant as sq

D, H = 8, 12
OUTLIERS = [1, 5]


def _model() -> onnx.ModelProto:
    """Pre-norm: LN1 → Q, K, V (shared input) → sum → MatMul W1 + b1 → Relu → MatMul W2 → LN2, whose output
    feeds MatMul W3 and the residual Add (post-norm style: no exact fold for W3)."""
    rng = np.random.default_rng(0)
    gamma = np.ones(D, np.float32)
    gamma[OUTLIERS] = 30.0  # activation outlier channels
    inits = {"g1": gamma, "b1n": np.zeros(D, np.float32) + 0.1, "g2": np.ones(D, np.float32) * 2,
             "b2n": np.zeros(D, np.float32), "b1": rng.normal(size=H).astype(np.float32)}
    for name, shape in (("wq", (D, D)), ("wk", (D, D)), ("wv", (D, D)), ("w1", (D, H)), ("w2", (H, D)),
                        ("w3", (D, D))):
        inits[name] = (rng.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g1", "b1n"], ["n1"], name="ln1", axis=-1),
        helper.make_node("MatMul", ["n1", "wq"], ["q"], name="q"),
        helper.make_node("MatMul", ["n1", "wk"], ["k"], name="k"),
        helper.make_node("MatMul", ["n1", "wv"], ["v"], name="v"),
        helper.make_node("Sum", ["q", "k", "v"], ["qkv"], name="sum"),
        helper.make_node("MatMul", ["qkv", "w1"], ["h"], name="ffn1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="ffn1_bias"),
        helper.make_node("Relu", ["hb"], ["hr"], name="relu"),
        helper.make_node("MatMul", ["hr", "w2"], ["f"], name="ffn2"),
        helper.make_node("LayerNormalization", ["f", "g2", "b2n"], ["n2"], name="ln2", axis=-1),
        helper.make_node("MatMul", ["n2", "w3"], ["o"], name="proj"),
        helper.make_node("Add", ["n2", "o"], ["y"], name="residual"),
    ]
    graph = helper.make_graph(
        nodes, "smooth", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 4, D])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 4, D])],
        [numpy_helper.from_array(value, name) for name, value in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _inputs(seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(size=(6, 4, D)).astype(np.float32)}


def _run(proto: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], feed)[0]


def _smoothed(alpha: float = 0.5, unabsorbed: str = "mul", min_ratio: float = 0.0) -> tuple[onnx.ModelProto, dict]:
    proto = _model()
    absmax = sq.activation_absmax(proto, sq.smoothable_tensors(proto), [_inputs(2)])
    return proto, sq.smooth(proto, absmax, alpha, unabsorbed, min_ratio)


def _init(proto: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(i) for i in proto.graph.initializer if i.name == name)


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.85])
def test_fp32_output_unchanged(alpha: float) -> None:
    proto, record = _smoothed(alpha)
    assert len(record["groups"]) == 4
    feed = _inputs(3)  # other inputs than the statistics came from
    np.testing.assert_allclose(_run(proto, feed), _run(_model(), feed), rtol=1e-4, atol=1e-4)


def test_shared_input_gets_one_scale_from_the_max_over_its_weights() -> None:
    original = _model()
    proto, record = _smoothed()
    group = next(g for g in record["groups"] if g["activation"] == "n1")
    assert sorted(group["matmuls"]) == ["k", "q", "v"] and group["absorber"] == "ln1"
    ratios = [_init(proto, w)[:, 0] / _init(original, w)[:, 0] for w in ("wq", "wk", "wv")]
    np.testing.assert_allclose(ratios[0], ratios[1], rtol=1e-5)
    np.testing.assert_allclose(ratios[0], ratios[2], rtol=1e-5)
    xmax = sq.activation_absmax(original, ["n1"], [_inputs(2)])["n1"]
    wmax = np.max([np.abs(_init(original, w)).max(axis=1) for w in ("wq", "wk", "wv")], axis=0)
    np.testing.assert_allclose(ratios[0], np.sqrt(xmax) / np.sqrt(wmax), rtol=1e-4)


def test_folds_into_layer_normalization_scale_and_bias() -> None:
    original = _model()
    proto, _ = _smoothed()
    scale = _init(proto, "wq")[:, 0] / _init(original, "wq")[:, 0]
    np.testing.assert_allclose(_init(proto, "g1"), _init(original, "g1") / scale, rtol=1e-5)
    np.testing.assert_allclose(_init(proto, "b1n"), _init(original, "b1n") / scale, rtol=1e-5)
    assert scale[OUTLIERS].min() > 3 * np.median(scale)  # the outlier channels move into the weights
    before = sq.activation_absmax(original, ["n1"], [_inputs(2)])["n1"]
    after = sq.activation_absmax(proto, ["n1"], [_inputs(2)])["n1"]
    assert after.max() / np.median(after) < 0.3 * before.max() / np.median(before)  # ... and X is flatter


def test_folds_through_relu_into_the_producing_matmul_and_its_bias() -> None:
    original = _model()
    proto, record = _smoothed()
    group = next(g for g in record["groups"] if g["activation"] == "hr")
    assert group["absorber"] == "ffn1"
    scale = _init(proto, "w2")[:, 0] / _init(original, "w2")[:, 0]
    np.testing.assert_allclose(_init(proto, "b1"), _init(original, "b1") / scale, rtol=1e-5)
    # w1's columns are divided by ffn2's s (its rows carry ffn1's own s, an inserted Mul's)
    ratio = _init(proto, "w1") / _init(original, "w1")
    np.testing.assert_allclose(ratio / ratio[:, :1], np.tile(scale[0] / scale, (D, 1)), rtol=1e-4)


def test_unabsorbable_input_gets_a_mul_or_is_skipped() -> None:
    proto, record = _smoothed(unabsorbed="mul")
    assert record["inserted"] == ["ffn1_smooth_mul", "proj_smooth_mul"]  # Sum and LN2 (+ residual) absorb nothing
    mul = next(n for n in proto.graph.node if n.name == "proj_smooth_mul")
    assert next(n for n in proto.graph.node if n.name == "proj").input[0] == mul.output[0]
    skipped, record = _smoothed(unabsorbed="skip")
    assert "n2" in record["skipped"] and "absorb" in record["skipped"]["n2"]
    assert not any(n.op_type == "Mul" for n in skipped.graph.node)
    np.testing.assert_array_equal(_init(skipped, "w3"), _init(_model(), "w3"))
    feed = _inputs(4)
    np.testing.assert_allclose(_run(skipped, feed), _run(_model(), feed), rtol=1e-4, atol=1e-4)


def test_inputs_without_outlier_channels_are_left_alone() -> None:
    proto, record = _smoothed(min_ratio=sq.OUTLIER_RATIO)
    assert [g["activation"] for g in record["groups"]] == ["n1"]  # only LN1's output has outliers
    assert "outlier" in record["skipped"]["hr"]
    np.testing.assert_array_equal(_init(proto, "w2"), _init(_model(), "w2"))


def test_alpha_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="alpha"):
        sq.smooth(_model(), {}, 1.5)


def test_folds_into_ort_skip_layer_normalization_without_touching_the_residual_sum() -> None:
    """ORT's transformer optimiser fuses residual Add + LayerNorm into SkipLayerNormalization: output 0 takes 1/s,
    output 3 (the residual sum, read by the next block) does not change."""
    rng = np.random.default_rng(0)
    gamma = np.ones(D, np.float32)
    gamma[OUTLIERS] = 30.0
    inits = [numpy_helper.from_array(gamma, "g"), numpy_helper.from_array(np.full(D, 0.1, np.float32), "b"),
             numpy_helper.from_array((rng.normal(size=(D, D)) / 3).astype(np.float32), "w")]
    nodes = [helper.make_node("SkipLayerNormalization", ["x", "x2", "g", "b"], ["n", "", "", "sum"], name="sln",
                              domain="com.microsoft", epsilon=1e-5),
             helper.make_node("MatMul", ["n", "w"], ["o"], name="proj"),
             helper.make_node("Add", ["o", "sum"], ["y"], name="residual")]
    x = [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [None, 4, D]) for name in ("x", "x2")]
    graph = helper.make_graph(nodes, "sln", x, [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    original = helper.make_model(graph, opset_imports=opsets)
    proto = onnx.ModelProto()
    proto.CopyFrom(original)
    feed = {"x": _inputs(5)["x"], "x2": _inputs(6)["x"]}
    record = sq.smooth(proto, sq.activation_absmax(proto, ["n"], [feed]), 0.5)
    assert [g["absorber"] for g in record["groups"]] == ["sln"] and not record["inserted"]
    np.testing.assert_allclose(_run(proto, feed), _run(original, feed), rtol=1e-4, atol=1e-4)


def test_per_layer_gives_each_group_its_own_alpha_and_keeps_fp32_output() -> None:
    proto = _model()
    absmax, rows = sq.activation_stats(proto, sq.smoothable_tensors(proto), [_inputs(2), _inputs(4)],
                                       keep_rows=True)
    assert set(rows) == set(sq.smoothable_tensors(proto)) and all(r.shape[1] in (D, H) for r in rows.values())
    record = sq.smooth(proto, absmax, "per_layer", min_ratio=0.0, rows=rows)
    by_input = {g["activation"]: g for g in record["groups"]}
    outlier_group = by_input["n1"]  # LN1's outlier channels (30x) feed Q, K and V
    assert outlier_group["alpha"] in sq.PER_LAYER_GRID
    errors = outlier_group["int8_error"]
    assert errors[f"{outlier_group['alpha']:g}"] == min(errors.values()) < errors["off"]
    for name, why in record["skipped"].items():  # a group left alone said why, with its errors
        assert "does not lower the int8 error" in why and name in rows
    feed = _inputs(3)
    np.testing.assert_allclose(_run(proto, feed), _run(_model(), feed), rtol=1e-4, atol=1e-4)


def test_per_layer_leaves_a_group_that_smoothing_would_hurt() -> None:
    from qtune.adaptors.onnxrt.smooth_alpha import choose_alpha, int8_error

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 16)).astype(np.float32)
    x[:, 3] *= 40.0  # an outlier channel: smoothing it pays
    weight = rng.normal(size=(16, 8)).astype(np.float32)
    helpful = np.ones(16, np.float32)
    helpful[3] = 8.0
    harmful = np.exp(rng.normal(scale=3.0, size=16)).astype(np.float32)  # scales spanning 1e-4..1e4
    assert int8_error(x, [weight], helpful) < int8_error(x, [weight], None) < int8_error(x, [weight], harmful)
    assert choose_alpha(x, [weight], {0.5: helpful, 0.7: harmful})[0] == 0.5
    chosen, errors = choose_alpha(x, [weight], {0.7: harmful})
    assert chosen is None and errors["0.7"] > errors["off"]


def test_row_sample_stays_within_its_budget_and_spans_the_batches() -> None:
    from qtune.adaptors.onnxrt.smooth_alpha import RowSample, row_budget

    sample = RowSample(2048)
    limit = row_budget(2048)
    for batch in range(20):
        sample.add(np.full((8, 64, 2048), float(batch), np.float32))
        assert sample.count <= 2 * limit + 8 * 64
    rows = sample.rows()
    assert rows.shape == (limit, 2048) and rows.nbytes <= 8 * 1024 * 1024
    assert rows[0, 0] == 0.0 and rows[-1, 0] >= 17.0  # from the first batch to the last ones


def test_a_bad_alpha_names_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="per_layer"):
        sq.smooth(_model(), {}, "per-layer")
