"""Every per-op knob of a tune config changes the produced graph as asked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_builders as builders
import pytest
from ort_helpers import QGraph, default_config, load, set_op

from qtune.adaptors.onnxrt import OnnxRuntimeAdaptor
from qtune.tuning import codec
from qtune.tuning.config import TuneConfig

FC0, FC1, FC2 = (f"fc{i}/MatMul/MatMulAddFusion" for i in range(3))


@pytest.fixture
def mlp(adaptor: OnnxRuntimeAdaptor, mlp_path: Path):
    model = load(adaptor, mlp_path)
    return model, default_config(adaptor.query_fw_capability(model))


def quantize(adaptor: OnnxRuntimeAdaptor, model, cfg: TuneConfig, data) -> QGraph:
    quantized = adaptor.quantize(codec.dump(cfg), model, data["calib"].loader(32))
    adaptor.predict(quantized, data["eval"].loader(200))  # loads and runs in onnxruntime
    return QGraph(quantized.path)


def test_default_config_quantizes_every_op(adaptor, mlp, mlp_data) -> None:
    model, cfg = mlp
    graph = quantize(adaptor, model, cfg, mlp_data)
    for name in (FC0, FC1, FC2):
        assert graph.dq_of_input(name, 0) is not None and graph.dq_of_input(name, 1) is not None
    assert adaptor.last_quantization["plan"]["excluded"] == {}


def test_fp32_op_has_no_qdq_around_it(adaptor, mlp, mlp_data) -> None:
    model, cfg = mlp
    cfg = cfg.with_fallback([FC1, "fc1/Relu", FC2])
    graph = quantize(adaptor, model, cfg, mlp_data)
    for name in (FC1, FC2):
        assert not graph.has_qdq_around(name), name
        weight = graph.node(name).input[1]
        assert graph.inits[weight].dtype == np.float32, "fp32 op keeps its fp32 weight"
    assert graph.dq_of_input(FC0, 1) is not None, "the other ops stay quantized"
    excluded = adaptor.last_quantization["plan"]["excluded"]
    assert set(excluded) == {FC1, "fc1/Relu", FC2}


def test_fp32_op_after_a_quantized_relu_reads_the_relu_output(adaptor, mlp, mlp_data) -> None:
    """ORT folds a quantized Relu into the Q of its input; an fp32 consumer must still see max(x, 0)."""
    model, cfg = mlp
    quantized = adaptor.quantize(codec.dump(cfg.with_fallback([FC1])), model, mlp_data["calib"].loader(32))
    graph = QGraph(quantized.path)
    assert graph.dq_of_input(FC1, 0) is None
    assert graph.producer[graph.node(FC1).input[0]].op_type == "Relu", "reads the real ReLU output"
    fp32 = adaptor.evaluate(model, mlp_data["eval"].loader(200))
    assert adaptor.evaluate(quantized, mlp_data["eval"].loader(200)) >= fp32 - 0.02


def test_weight_granularity(adaptor, mlp, mlp_data) -> None:
    model, cfg = mlp
    cfg = set_op(cfg, FC0, weight={"granularity": "per_channel"})
    cfg = set_op(cfg, FC1, weight={"granularity": "per_tensor"})
    graph = quantize(adaptor, model, cfg, mlp_data)
    scale0, _, q0 = graph.qparams(graph.dq_of_input(FC0, 1))
    scale1, _, _ = graph.qparams(graph.dq_of_input(FC1, 1))
    assert scale0.shape == (q0.shape[1],), "per-channel: one scale per output column (Gemm B axis 1)"
    assert scale1.shape == (), "per-tensor: a scalar scale"


def test_conv_per_channel_axis(adaptor: OnnxRuntimeAdaptor, cnn_path: Path, cnn_data) -> None:
    model = load(adaptor, cnn_path)
    cfg = default_config(adaptor.query_fw_capability(model))
    cfg = set_op(cfg, "conv2", weight={"granularity": "per_tensor"})
    graph = quantize(adaptor, model, cfg, cnn_data)
    dq = graph.dq_of_input("conv1", 1)
    scale, _, _ = graph.qparams(dq)
    assert scale.shape == (8,) and any(a.name == "axis" and a.i == 0 for a in dq.attribute)
    assert graph.qparams(graph.dq_of_input("conv2", 1))[0].shape == ()


def test_activation_dtype(adaptor, mlp, mlp_data) -> None:
    model, cfg = mlp
    cfg = set_op(cfg, FC1, activation={"dtype": "int8"})
    cfg = set_op(cfg, FC2, activation={"dtype": "uint8"})
    graph = quantize(adaptor, model, cfg, mlp_data)
    assert graph.qparams(graph.dq_of_input(FC1, 0))[1].dtype == np.int8
    assert graph.qparams(graph.dq_of_input(FC2, 0))[1].dtype == np.uint8


def test_activation_scheme(adaptor, mlp, mlp_data) -> None:
    """The input pixels are in [0, 1]: asymmetric int8 puts the zero point at -128, symmetric at 0."""
    model, cfg = mlp
    asym = set_op(cfg, FC0, activation={"dtype": "int8", "scheme": "asym"})
    graph = quantize(adaptor, model, asym, mlp_data)
    assert int(graph.qparams(graph.dq_of_input(FC0, 0))[1]) == -128
    sym = set_op(cfg, FC0, activation={"dtype": "int8", "scheme": "sym"})
    graph = quantize(adaptor, model, sym, mlp_data)
    scale, zero, _ = graph.qparams(graph.dq_of_input(FC0, 0))
    assert int(zero) == 0
    assert float(scale) == pytest.approx(1.0 / 127, rel=1e-3)


def test_activation_reduce_range(adaptor, mlp, mlp_data) -> None:
    model, cfg = mlp
    full = quantize(adaptor, model, cfg, mlp_data)
    full_scale = float(full.qparams(full.dq_of_input(FC0, 0))[0])
    reduced_cfg = set_op(cfg, FC0, activation={"reduce_range": True})
    reduced = quantize(adaptor, model, reduced_cfg, mlp_data)
    scale = float(reduced.qparams(reduced.dq_of_input(FC0, 0))[0])
    assert full_scale == pytest.approx(1.0 / 255, rel=1e-3)
    assert scale == pytest.approx(1.0 / 127, rel=1e-3), "7-bit activations: uint8 range 0..127"


def test_weight_dtype_scheme_and_reduce_range(adaptor, mlp, mlp_data) -> None:
    model, cfg = mlp
    cfg = set_op(cfg, FC0, weight={"dtype": "int8", "scheme": "sym", "reduce_range": True})
    cfg = set_op(cfg, FC1, weight={"dtype": "uint8", "scheme": "asym", "granularity": "per_tensor"})
    cfg = set_op(cfg, FC2, weight={"dtype": "int8", "scheme": "asym", "granularity": "per_tensor"})
    graph = quantize(adaptor, model, cfg, mlp_data)
    _, zero0, q0 = graph.qparams(graph.dq_of_input(FC0, 1))
    assert q0.dtype == np.int8 and np.all(zero0 == 0)
    assert q0.min() >= -64 and q0.max() <= 64 and np.abs(q0).max() >= 60, "7-bit weights"
    _, zero1, q1 = graph.qparams(graph.dq_of_input(FC1, 1))
    assert q1.dtype == np.uint8 and zero1.dtype == np.uint8 and 0 < int(zero1) < 255
    _, zero2, q2 = graph.qparams(graph.dq_of_input(FC2, 1))
    assert q2.dtype == np.int8 and int(zero2) != 0, "asymmetric int8 weight: non-zero zero point"
    assert q2.min() == -128 and q2.max() == 127


def test_calibration_algorithms_give_different_scales(adaptor, mlp, mlp_data) -> None:
    model, cfg = mlp
    scales = {}
    # FC2 reads fc1's ReLU output, whose long tail KL and percentile clip (KL keeps fc0's whole range)
    for algorithm in ("minmax", "kl", "percentile"):
        graph = quantize(adaptor, model, set_op(cfg, FC2, activation={"algorithm": algorithm}), mlp_data)
        scales[algorithm] = float(graph.qparams(graph.dq_of_input(FC2, 0))[0])
        # the other ops keep their (minmax) scale for their own inputs
        assert float(graph.qparams(graph.dq_of_input(FC0, 0))[0]) == pytest.approx(1.0 / 255, rel=1e-3)
    assert scales["kl"] != pytest.approx(scales["minmax"], rel=1e-3)
    assert scales["percentile"] != scales["minmax"]
    assert scales["kl"] < scales["minmax"] and scales["percentile"] < scales["minmax"]


def test_weight_only_and_activation_only(adaptor, mlp, mlp_data) -> None:
    model, cfg = mlp
    cfg = set_op(cfg, FC1, activation={"dtype": "fp32", "scheme": None, "algorithm": None})
    cfg = set_op(cfg, FC2, weight={"dtype": "fp32", "scheme": None, "granularity": None})
    graph = quantize(adaptor, model, cfg, mlp_data)
    assert graph.dq_of_input(FC1, 0) is None, "activation fp32"
    assert graph.dq_of_input(FC1, 1) is not None, "weight int8"
    assert graph.dq_of_input(FC2, 0) is not None, "activation int8"
    assert graph.dq_of_input(FC2, 1) is None and graph.inits[graph.node(FC2).input[1]].dtype == np.float32
    fp32 = adaptor.evaluate(model, mlp_data["eval"].loader(200))
    assert adaptor.evaluate(adaptor.quantize(codec.dump(cfg), model, mlp_data["calib"].loader(32)),
                            mlp_data["eval"].loader(200)) >= fp32 - 0.02


def test_dynamic_produces_integer_ops(adaptor, mlp, mlp_data) -> None:
    model, cfg = mlp
    dynamic = TuneConfig("dynamic", cfg.format, cfg.ops, cfg.calibration_sampling_size)
    dynamic = dynamic.with_fallback([FC2])
    graph = quantize(adaptor, model, dynamic, mlp_data)
    types = graph.op_types()
    assert types.count("MatMulInteger") == 2 and types.count("DynamicQuantizeLinear") == 2
    # ORT's dynamic quantizer rewrites every Gemm as <name>_MatMul + <name>_Add; the fp32 one stays float
    assert graph.node(f"{FC2}_MatMul").op_type == "MatMul"
    assert adaptor.timings["calibration"] == 0.0
    assert adaptor.evaluate(adaptor.quantize(codec.dump(dynamic), model, mlp_data["calib"].loader(32)),
                            mlp_data["eval"].loader(200)) > 0.95


def test_dynamic_leaves_conv_alone(adaptor: OnnxRuntimeAdaptor, cnn_path: Path, cnn_data) -> None:
    model = load(adaptor, cnn_path)
    cfg = default_config(adaptor.query_fw_capability(model), approach="dynamic")
    graph = quantize(adaptor, model, cfg, cnn_data)
    assert "ConvInteger" not in graph.op_types() and graph.op_types().count("Conv") == 2
    assert "MatMulInteger" in graph.op_types()
    assert "static only" in adaptor.last_quantization["plan"]["excluded"]["conv1"]


def test_qoperator_format(adaptor: OnnxRuntimeAdaptor, cnn_path: Path, cnn_data, tmp_path: Path) -> None:
    model = load(adaptor, cnn_path)
    cfg = default_config(adaptor.query_fw_capability(model), quant_format="QOperator")
    graph = quantize(adaptor, model, cfg, cnn_data)
    assert graph.op_types().count("QLinearConv") == 2
    fp32 = adaptor.evaluate(model, cnn_data["eval"].loader(200))
    quantized = adaptor.quantize(codec.dump(cfg), model, cnn_data["calib"].loader(32))
    assert adaptor.evaluate(quantized, cnn_data["eval"].loader(200)) >= fp32 - 0.03

    matmul = load(adaptor, builders.save(builders.mask_proto(mask_value=-4.0), tmp_path / "mm.onnx"))
    cfg = default_config(adaptor.query_fw_capability(matmul), quant_format="QOperator")
    data = builders.digits()
    from qtune.data import Dataset

    calib = Dataset(builders.mlp_input(data["x_train"][:64]))
    graph = quantize(adaptor, matmul, cfg, {"calib": calib, "eval": calib})
    assert "QLinearMatMul" in graph.op_types()


def test_all_fp32_config_returns_fp32_model(adaptor, mlp, mlp_data) -> None:
    model, cfg = mlp
    graph = quantize(adaptor, model, cfg.with_fallback(list(cfg.ops)), mlp_data)
    assert "QuantizeLinear" not in graph.op_types() and "DequantizeLinear" not in graph.op_types()


def test_qoperator_mixes_per_channel_and_per_tensor(adaptor: OnnxRuntimeAdaptor, cnn_path: Path, cnn_data) -> None:
    """QOperator only has a global per-channel switch: a per-tensor op then gets one range for all
    channels (equal scales), numerically per-tensor."""
    model = load(adaptor, cnn_path)
    cfg = default_config(adaptor.query_fw_capability(model), quant_format="QOperator")
    cfg = set_op(cfg, "conv2", weight={"granularity": "per_tensor"})
    graph = quantize(adaptor, model, cfg, cnn_data)
    scales = {}
    for node in graph.graph.node:
        if node.op_type == "QLinearConv":
            scales[node.output[0]] = graph.value(node.input[4])  # w_scale
    per_channel, per_tensor = sorted(scales.values(), key=lambda s: len(np.unique(s)), reverse=True)
    assert len(np.unique(per_channel)) > 1
    assert len(np.unique(per_tensor)) == 1


@pytest.mark.parametrize("seed", range(4))
def test_random_configs_load_run_and_stay_close(adaptor: OnnxRuntimeAdaptor, cnn_path: Path, mlp_path: Path,
                                                cnn_data, mlp_data, seed: int) -> None:
    """Any combination of the offered choices yields a model onnxruntime runs, near fp32 accuracy."""
    import random

    rng = random.Random(seed)
    for path, data in ((cnn_path, cnn_data), (mlp_path, mlp_data)):
        model = load(adaptor, path)
        capability = adaptor.query_fw_capability(model)
        quant_format = rng.choice(["QDQ", "QOperator"])
        approach = rng.choice(["static", "static", "dynamic"])
        cfg = default_config(capability, approach=approach, quant_format=quant_format, samples=64)
        for (name, _), entry in capability["opwise"].items():
            activation = {key: rng.choice(values) for key, values in entry["activation"].items()}
            if activation["dtype"] == "fp32":
                activation = {"dtype": "fp32", "scheme": None, "algorithm": None, "granularity": None}
            weight = None
            if "weight" in entry:
                weight = {key: rng.choice(values) for key, values in entry["weight"].items()}
                if weight["dtype"] == "fp32":
                    weight = {"dtype": "fp32", "scheme": None, "granularity": None, "algorithm": None}
            cfg = set_op(cfg, name, activation=activation, weight=weight)
        fp32 = adaptor.evaluate(model, data["eval"].loader(200))
        quantized = adaptor.quantize(codec.dump(cfg), model, data["calib"].loader(32))
        assert adaptor.evaluate(quantized, data["eval"].loader(200)) >= fp32 - 0.1, codec.dump(cfg)


def test_a_quantized_conv_before_fp32_ops_still_runs_as_an_int8_kernel(adaptor: OnnxRuntimeAdaptor, cnn_path: Path,
                                                                       cnn_data, tmp_path: Path) -> None:
    """Only the compute ops in int8 (Conv and Gemm; Relu, MaxPool, Flatten fp32): each keeps the Q on its
    output, its fp32 consumers read the DequantizeLinear, and ONNX Runtime fuses every one of them into
    an int8 kernel. Giving the consumers the fp32 tensor instead would drop that Q and leave the Conv in
    fp32 on dequantized inputs (slower than fp32)."""
    import onnx
    import onnxruntime as ort

    model = load(adaptor, cnn_path)
    cfg = default_config(adaptor.query_fw_capability(model))
    compute = {name for name, op in cfg.ops.items() if op.op_type in ("Conv", "Gemm")}
    assert compute, cfg.ops
    cfg = cfg.with_fallback([name for name in cfg.ops if name not in compute])
    quantized = adaptor.quantize(codec.dump(cfg), model, cnn_data["calib"].loader(32))
    graph = QGraph(quantized.path)
    for name in compute:
        consumers = [c for out in graph.node(name).output for c in graph.consumers.get(out, [])]
        assert consumers and all(n.op_type == "QuantizeLinear" for n in consumers), (name, consumers)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(quantized.path), options, providers=["CPUExecutionProvider"])
    kernels = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "Conv" not in kernels and "FusedConv" not in kernels, kernels
    assert kernels.count("QLinearConv") == sum(cfg.ops[n].op_type == "Conv" for n in compute), kernels
    fp32 = adaptor.evaluate(model, cnn_data["eval"].loader(200))
    assert adaptor.evaluate(quantized, cnn_data["eval"].loader(200)) >= fp32 - 0.03
