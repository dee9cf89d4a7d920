"""examples/decoder_lm: the build is deterministic and its ONNX graph is the torch model, whole and with a KV cache.

A tiny config (d_model 32) stands in for the 2048-wide one: the same code paths in a second."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "decoder_lm"


def _build_module():  # noqa: ANN202
    sys.path.insert(0, str(EXAMPLE))
    spec = importlib.util.spec_from_file_location("decoder_lm_build", EXAMPLE / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def build():  # noqa: ANN201
    """The build module; the process-wide torch settings its training sets (deterministic kernels, threads) are
    put back afterwards, so later tests in the same process (e.g. torch's quantized ops) run as before."""
    import torch

    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    yield _build_module()
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)


def _tiny(build):  # noqa: ANN001, ANN202
    return build.Config(d_model=32, layers=2, heads=4, mlp=48, max_positions=64)


def _weights(model) -> dict[str, np.ndarray]:  # noqa: ANN001
    return {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}


def test_the_same_seed_gives_the_same_weights_and_another_seed_others(build) -> None:  # noqa: ANN001
    ids = build.encode(build.corpus()[:20_000])
    kwargs = {"steps": 3, "batch": 2, "window": 16, "threads": 1}
    first = _weights(build.train(_tiny(build), ids, seed=0, **kwargs))
    again = _weights(build.train(_tiny(build), ids, seed=0, **kwargs))
    other = _weights(build.train(_tiny(build), ids, seed=1, **kwargs))
    assert first.keys() == again.keys() and all(np.array_equal(first[k], again[k]) for k in first)
    assert any(not np.array_equal(first[k], other[k]) for k in first)


def test_the_onnx_graph_is_the_torch_model_whole_and_step_by_step(build, tmp_path: Path) -> None:  # noqa: ANN001
    import onnx

    config = _tiny(build)
    ids = build.encode(build.corpus()[:20_000])
    model = build.train(config, ids, steps=2, batch=2, window=16, seed=0, threads=1)
    build.write_onnx(model, config, tmp_path / "tiny.onnx")
    assert build.check_onnx(model, config, tmp_path / "tiny.onnx", ids[None, :24], threads=1) < 1e-4
    graph = onnx.load(str(tmp_path / "tiny.onnx")).graph
    weights = {init.name for init in graph.initializer if len(init.dims) == 2}
    weight_matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert len(weight_matmuls) == 6 * config.layers + 1
    assert [i.name for i in graph.input] == ["input_ids", "past_key_values.0.key", "past_key_values.0.value",
                                             "past_key_values.1.key", "past_key_values.1.value"]
    assert [o.name for o in graph.output] == ["logits", "present.0.key", "present.0.value", "present.1.key",
                                              "present.1.value"]


def test_held_out_text_is_never_trained_on(build) -> None:  # noqa: ANN001
    ids = build.encode(build.corpus())
    train_ids, held_out = build.split(ids)
    assert len(train_ids) + len(held_out) == len(ids) and len(held_out) > 40_000
    inputs, labels = build.windows(held_out, 4)
    assert np.array_equal(inputs[0, 1:], labels[0, :-1]) and inputs.shape == (4, build.WINDOW)
