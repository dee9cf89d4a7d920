"""The PyTorch adaptor with real torch (CPU, x86 backend) on small models trained in code.

Skipped only when torch is not importable. A tuning-run test (qtune.local on a small torch model
meeting its criterion) belongs with the lead's local-tuning tests.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from qtune.adaptors import get_adaptor_class  # noqa: E402
from qtune.data import Dataset  # noqa: E402
from qtune.spec.errors import ModelLoadError  # noqa: E402
from qtune.spec.models import QuantizationSpec  # noqa: E402
from qtune.tuning.config import TuneConfig  # noqa: E402
from qtune.tuning.space import build_space  # noqa: E402

pytestmark = pytest.mark.torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch_models  # noqa: E402

from qtune.tuning import codec  # noqa: E402

CNN_INPUTS = [{"name": "image", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]
OPS = ["conv1", "conv2", "fc1", "fc2"]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits_cnn(tmp_path_factory):
    """A trained conv-bn-relu CNN (state_dict file), calibration and evaluation sets."""
    folder = tmp_path_factory.mktemp("digits_cnn")
    images, labels = torch_models.digits()
    order = np.random.default_rng(0).permutation(len(images))
    train, held_out = order[:1300], order[1300:]
    model = torch_models.train(torch_models.build_cnn(), images[train], labels[train])
    weights = folder / "cnn.pt"
    torch.save(model.state_dict(), weights)
    calibration = Dataset({"image": images[train[:256]]}, labels[train[:256]])
    evaluation = Dataset({"image": images[held_out]}, labels[held_out])
    return {"folder": folder, "weights": weights, "model": model, "calib": calibration, "eval": evaluation}


def make_adaptor(workspace: Path, **info):
    return get_adaptor_class("pytorch")({"workspace": str(workspace), "threads": 2, "job_dir": str(HERE), **info})


def load_cnn(adaptor, digits_cnn):
    return adaptor.load_model({"framework": "pytorch", "entrypoint": "torch_models:build_cnn",
                               "weights": str(digits_cnn["weights"]), "inputs": CNN_INPUTS})


def default_config(adaptor, model, approach: str = "static", samples: int = 256) -> TuneConfig:
    capability = adaptor.query_fw_capability(model)
    space = build_space(capability, QuantizationSpec(approach=approach), adaptor.query_fused_patterns(model), samples)
    return space.default_config(approach)


@pytest.fixture()
def loaded(digits_cnn, tmp_path):
    adaptor = make_adaptor(tmp_path / "ws")
    return adaptor, load_cnn(adaptor, digits_cnn)


def module_types(quantized) -> dict[str, str]:
    modules = dict(quantized.module.named_modules())
    return {name: f"{type(modules[name]).__module__}.{type(modules[name]).__name__}" for name in OPS if name in modules}


# --- capability --------------------------------------------------------------------------------
def test_capability_lists_ops_in_graph_order_with_torch_choices(loaded):
    adaptor, model = loaded
    capability = adaptor.query_fw_capability(model)
    assert capability["graph_order"] == OPS
    assert set(capability["opwise"]) == {("conv1", "Conv2d"), ("conv2", "Conv2d"), ("fc1", "Linear"), ("fc2", "Linear")}
    conv, linear = capability["optypewise"]["Conv2d"], capability["optypewise"]["Linear"]
    assert conv["approach"] == ["static"] and linear["approach"] == ["static", "dynamic"]
    assert linear["activation"]["dtype"][-1] == "fp32" and linear["weight"]["dtype"][-1] == "fp32"
    assert linear["activation"]["algorithm"] == ["minmax", "kl"]  # no percentile observer in torch
    assert linear["weight"]["granularity"] == ["per_channel", "per_tensor"]
    assert "conv1" in capability["notes"]  # says why convolutions are static only
    assert adaptor.input_names(model) == ["image"]


def test_tune_config_round_trips_through_json_and_is_honoured(loaded, digits_cnn):
    adaptor, model = loaded
    config = default_config(adaptor, model)
    wire = json.loads(json.dumps(codec.dump(config)))  # what travels to a trial process or a pod
    assert codec.load(TuneConfig, wire).key() == config.key()
    quantized = adaptor.quantize(wire, model, digits_cnn["calib"].loader(32))
    assert sorted(quantized.quantized_ops) == sorted(OPS)
    assert quantized.fp32_ops == {}
    fp32 = adaptor.evaluate(model, digits_cnn["eval"].loader(64))
    int8 = adaptor.evaluate(quantized, digits_cnn["eval"].loader(64))
    assert fp32 > 0.9
    assert int8 >= fp32 - 0.03


def test_fused_patterns_of_a_conv_bn_relu_model(loaded):
    adaptor, model = loaded
    patterns = adaptor.query_fused_patterns(model)
    assert ["Conv2d", "BatchNorm2d", "ReLU"] in patterns
    assert ["Conv2d", "ReLU"] in patterns
    assert ["Linear", "ReLU"] in patterns
    assert not any("Conv3d" in p for p in patterns)  # only patterns of op types present


# --- quantization --------------------------------------------------------------------------------
def test_static_int8_converts_every_op_to_int8_kernels_with_fusion(loaded, digits_cnn):
    adaptor, model = loaded
    quantized = adaptor.quantize(codec.dump(default_config(adaptor, model)), model, digits_cnn["calib"].loader(32))
    types = module_types(quantized)
    assert types["conv1"].endswith("intrinsic.quantized.modules.conv_relu.ConvReLU2d")  # bn folded, relu fused
    assert types["conv2"].endswith("ConvReLU2d")
    assert types["fc1"].endswith("LinearReLU")
    assert "quantized" in types["fc2"]
    assert "bn1" not in dict(quantized.module.named_modules())


def test_per_op_fallback_changes_the_converted_graph(loaded, digits_cnn):
    adaptor, model = loaded
    base = default_config(adaptor, model)
    full = adaptor.quantize(codec.dump(base), model, digits_cnn["calib"].loader(32))
    partial = adaptor.quantize(codec.dump(base.with_fallback(["conv2"])), model, digits_cnn["calib"].loader(32))
    assert "conv2" not in partial.quantized_ops and set(partial.quantized_ops) == {"conv1", "fc1", "fc2"}
    assert partial.fp32_ops == {"conv2": "fp32 in the tune config"}
    types = module_types(partial)
    assert "quantized" not in types["conv2"]  # a float (fused) ConvReLU2d
    assert "quantized" in types["conv1"]
    assert partial.module.code != full.module.code  # dequantize before / quantize after conv2
    assert "dequantize" in partial.module.code
    accuracy = adaptor.evaluate(partial, digits_cnn["eval"].loader(64))
    assert accuracy >= adaptor.evaluate(model, digits_cnn["eval"].loader(64)) - 0.03


def test_dynamic_quantizes_linear_only(loaded, digits_cnn):
    adaptor, model = loaded
    config = default_config(adaptor, model, approach="dynamic")
    assert set(config.quantized_ops()) == {"fc1", "fc2"}
    quantized = adaptor.quantize(codec.dump(config), model, digits_cnn["calib"].loader(32))
    assert sorted(quantized.quantized_ops) == ["fc1", "fc2"]
    assert adaptor.timings["calibration"] == 0.0  # dynamic needs no calibration
    types = module_types(quantized)
    assert types["fc2"].endswith("DynamicLinear")
    assert "quantized" not in types["conv1"]
    assert adaptor.evaluate(quantized, digits_cnn["eval"].loader(64)) >= adaptor.evaluate(
        model, digits_cnn["eval"].loader(64)) - 0.02


def test_per_tensor_weights_and_kl_calibration_are_honoured(loaded, digits_cnn):
    adaptor, model = loaded
    base = default_config(adaptor, model)
    ops = {}
    for name, op in codec.dump(base)["ops"].items():
        op = copy.deepcopy(op)
        op["weight"]["granularity"] = "per_tensor"
        op["activation"]["algorithm"] = "kl"
        ops[name] = op
    config = {**codec.dump(base), "ops": ops}
    quantized = adaptor.quantize(config, model, digits_cnn["calib"].loader(32))
    fc2 = dict(quantized.module.named_modules())["fc2"]
    weight = fc2.weight()
    assert weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric)  # one scale, zero point 0
    assert weight.q_zero_point() == 0
    assert adaptor.timings["calibration"] > 0  # histogram statistics are a separate cache entry


# --- calibration cache -----------------------------------------------------------------------------
def test_calibration_is_collected_once_per_job_and_reused(digits_cnn, tmp_path):
    workspace = tmp_path / "ws"
    adaptor = make_adaptor(workspace)
    model = load_cnn(adaptor, digits_cnn)
    base = default_config(adaptor, model)
    first = adaptor.quantize(codec.dump(base), model, digits_cnn["calib"].loader(32))
    assert adaptor.timings["calibration"] > 0
    assert set(adaptor.timings) == {"calibration", "quantize"}
    assert list((workspace / "calibration").glob("*-minmax.pt"))

    other = base.with_fallback(["fc1"])
    ops = codec.dump(other)["ops"]
    ops["conv2"]["activation"]["scheme"] = "sym"
    adaptor.quantize({**codec.dump(other), "ops": ops}, model, digits_cnn["calib"].loader(32))
    assert adaptor.timings["calibration"] == 0.0

    # another trial process: a new adaptor on the same workspace reads the cache from disk
    again = make_adaptor(workspace)
    second = again.quantize(codec.dump(base), load_cnn(again, digits_cnn), digits_cnn["calib"].loader(32))
    assert again.timings["calibration"] == 0.0
    batch = {"image": digits_cnn["eval"].inputs["image"][:64]}
    np.testing.assert_array_equal(adaptor.predict(first, Dataset(batch).loader(64)),
                                  again.predict(second, Dataset(batch).loader(64)))

    # other calibration data -> other statistics
    fewer = {**codec.dump(base), "calibration_sampling_size": 64}
    again.quantize(fewer, load_cnn(again, digits_cnn), digits_cnn["calib"].loader(32))
    assert again.timings["calibration"] > 0


def test_non_finite_calibration_range_keeps_the_op_fp32(tmp_path):
    adaptor = make_adaptor(tmp_path / "ws")
    model = adaptor.load_model({"entrypoint": "torch_models:build_masked_mlp",
                                "inputs": [{"name": "image", "shape": ["batch", 1, 8, 8]}]})
    images, labels = torch_models.digits()
    calibration = Dataset({"image": images[:64]}, labels[:64])
    config = default_config(adaptor, model, samples=64)
    quantized = adaptor.quantize(codec.dump(config), model, calibration.loader(32))
    assert quantized.quantized_ops == ["fc1"]
    assert "fc2" in adaptor.range_problems and "fc2" in quantized.fp32_ops
    outputs = adaptor.predict(quantized, calibration.loader(32))
    assert np.isfinite(outputs).all()


# --- loading ---------------------------------------------------------------------------------------
def test_loading_refuses_a_pickled_model_file(digits_cnn, tmp_path):
    adaptor = make_adaptor(tmp_path / "ws")
    pickled = tmp_path / "model.pt"
    torch.save(digits_cnn["model"], pickled)  # the whole module: unpickling would run code
    with pytest.raises(ModelLoadError, match="refusing to unpickle"):
        adaptor.load_model({"path": str(pickled)})
    disguised = tmp_path / "model.pt2"
    disguised.write_bytes(pickled.read_bytes())
    with pytest.raises(ModelLoadError, match="refusing to unpickle"):
        adaptor.load_model({"path": str(disguised)})
    with pytest.raises(ModelLoadError, match="not a weights-only file"):
        adaptor.load_model({"entrypoint": "torch_models:build_cnn", "weights": str(pickled), "inputs": CNN_INPUTS})


def test_loading_reports_missing_corrupt_and_mismatched_files(digits_cnn, tmp_path):
    adaptor = make_adaptor(tmp_path / "ws")
    with pytest.raises(ModelLoadError, match="not found"):
        adaptor.load_model({"path": str(tmp_path / "absent.pt2")})
    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(b"\x00not a zip archive" * 10)
    with pytest.raises(ModelLoadError):
        adaptor.load_model({"path": str(corrupt)})
    with pytest.raises(ModelLoadError, match="weights file, not a model"):
        adaptor.load_model({"path": str(digits_cnn["weights"])})
    with pytest.raises(ModelLoadError, match="do not match"):
        adaptor.load_model({"entrypoint": "torch_models:build_masked_mlp", "weights": str(digits_cnn["weights"]),
                            "inputs": CNN_INPUTS})
    with pytest.raises(ModelLoadError, match="cannot import"):
        adaptor.load_model({"entrypoint": "no_such_module_here:build", "inputs": CNN_INPUTS})


def test_export_program_round_trip_and_quantize_from_pt2(loaded, digits_cnn, tmp_path):
    adaptor, model = loaded
    saved = adaptor.save_model(model, tmp_path / "fp32")
    assert saved.suffix == ".pt2"
    reloaded = adaptor.load_model({"path": str(saved)})
    assert adaptor.query_fw_capability(reloaded)["graph_order"] == OPS  # same op names as the module
    quantized = adaptor.quantize(codec.dump(default_config(adaptor, reloaded)), reloaded,
                                 digits_cnn["calib"].loader(32))
    assert sorted(quantized.quantized_ops) == sorted(OPS)
    assert adaptor.evaluate(quantized, digits_cnn["eval"].loader(50)) > 0.9  # odd batch sizes: batch is dynamic


def test_saved_int8_model_loads_without_qtune(loaded, digits_cnn, tmp_path):
    adaptor, model = loaded
    quantized = adaptor.quantize(codec.dump(default_config(adaptor, model)), model, digits_cnn["calib"].loader(32))
    path = adaptor.save_model(quantized, tmp_path / "best")
    meta = json.loads((path.parent / "qtune_model.json").read_text())
    assert meta["inputs"] == ["image"] and sorted(meta["int8_ops"]) == sorted(OPS)
    scripted = torch.jit.load(str(path))
    batch = torch.from_numpy(digits_cnn["eval"].inputs["image"][:7])
    with torch.inference_mode():
        np.testing.assert_allclose(scripted(batch).numpy(), quantized.module(batch).numpy(), atol=1e-5)
    assert 0 < adaptor.model_size(quantized) < adaptor.model_size(model)


def test_static_int8_exports_to_qdq_onnx(loaded, digits_cnn, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    adaptor, model = loaded
    quantized = adaptor.quantize(codec.dump(default_config(adaptor, model)), model, digits_cnn["calib"].loader(32))
    path = adaptor.export_onnx(quantized, tmp_path / "int8.onnx")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = digits_cnn["eval"].inputs["image"][:64]
    scores = session.run(None, {session.get_inputs()[0].name: images})[0]
    agree = (scores.argmax(1) == adaptor.predict(quantized, Dataset({"image": images}).loader(64)).argmax(1)).mean()
    assert agree >= 0.95


# --- running ---------------------------------------------------------------------------------------
def test_benchmark_and_sensitivity(loaded, digits_cnn):
    adaptor, model = loaded
    batch = {"image": digits_cnn["eval"].inputs["image"][:32]}
    stats = adaptor.benchmark(model, batch, warmup=2, runs=5, threads=1)
    assert stats.batch_size == 32 and stats.runs == 5 and stats.threads == 1
    assert 0 < stats.p50_ms <= stats.p90_ms
    config = default_config(adaptor, model).with_fallback(["fc2"])
    scores = adaptor.op_sensitivity(model, codec.dump(config), digits_cnn["calib"])
    assert set(scores) == set(OPS)
    assert scores["fc2"] == 0.0
    assert all(scores[name] > 0 for name in ("conv1", "conv2", "fc1"))


def test_model_without_declared_inputs_is_exported_from_the_first_calibration_batch(digits_cnn, tmp_path):
    adaptor = make_adaptor(tmp_path / "ws")
    model = adaptor.load_model({"entrypoint": "torch_models:build_cnn", "weights": str(digits_cnn["weights"])})
    assert adaptor.input_names(model) == ["image"]  # from forward's signature
    capability = adaptor.query_fw_capability(model)
    assert capability["graph_order"] == OPS  # module names = graph op names
    assert ["Conv2d", "BatchNorm2d", "ReLU"] in adaptor.query_fused_patterns(model)
    quantized = adaptor.quantize(codec.dump(default_config(adaptor, model)), model, digits_cnn["calib"].loader(32))
    assert sorted(quantized.quantized_ops) == sorted(OPS)
    assert adaptor.query_fw_capability(model)["graph_order"] == OPS
