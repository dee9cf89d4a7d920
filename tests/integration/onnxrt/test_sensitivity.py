"""op_sensitivity and the int8-hostile MLP built for the tuning tests (tests/integration/sensitive_model.py)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from ort_helpers import default_config, load
from sensitive_model import INPUT_NAME, _data, _proto, _trained, build_sensitive_mlp

from qtune.adaptors.onnxrt import OnnxRuntimeAdaptor
from qtune.data import Dataset
from qtune.tuning import codec


@pytest.fixture(scope="module")
def sensitive(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("sensitive")
    model_path, calib_npz, eval_npz, names = build_sensitive_mlp(folder)
    with np.load(calib_npz) as calib, np.load(eval_npz) as evaluation:
        return {
            "path": model_path, "names": names,
            "calib": Dataset({INPUT_NAME: calib[INPUT_NAME]}, calib["labels"]),
            "eval": Dataset({INPUT_NAME: evaluation[INPUT_NAME]}, evaluation["labels"]),
            "workspace": folder / "workspace",
        }


def test_npz_layout(sensitive) -> None:
    assert sensitive["calib"].inputs[INPUT_NAME].shape == (200, 64)
    assert sensitive["calib"].inputs[INPUT_NAME].dtype == np.float32
    assert sensitive["eval"].inputs[INPUT_NAME].shape == (597, 64)
    assert sensitive["eval"].labels.dtype == np.int64
    assert len(sensitive["names"]) == 3


def test_hostile_edit_preserves_fp32_function(sensitive) -> None:
    original = _proto(*_trained())
    x = _data()["x_eval"]
    plain = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    hostile = ort.InferenceSession(str(sensitive["path"]), providers=["CPUExecutionProvider"])
    expected = plain.run(None, {INPUT_NAME: x})[0]
    got = hostile.run(None, {INPUT_NAME: x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_only_the_hostile_ops_break_int8(sensitive) -> None:
    adaptor = OnnxRuntimeAdaptor({"workspace": str(sensitive["workspace"]), "threads": 1})
    model = load(adaptor, sensitive["path"])
    capability = adaptor.query_fw_capability(model)
    assert len(capability["graph_order"]) >= 24, "dozens of quantizable ops"
    assert set(sensitive["names"]) <= set(capability["graph_order"])
    evaluation = sensitive["eval"].loader(128)
    fp32 = adaptor.evaluate(model, evaluation)
    assert fp32 >= 0.95

    cfg = default_config(capability, samples=200)
    full = adaptor.evaluate(adaptor.quantize(codec.dump(cfg), model, sensitive["calib"].loader(64)), evaluation)
    assert full < fp32 - 0.05, "full int8 collapses"

    rescued = cfg.with_fallback(sensitive["names"])
    accuracy = adaptor.evaluate(adaptor.quantize(codec.dump(rescued), model, sensitive["calib"].loader(64)), evaluation)
    assert accuracy >= fp32 * 0.99, (fp32, accuracy)

    for name in sensitive["names"]:  # each one alone in int8 is enough to break it
        alone = cfg.with_fallback([other for other in sensitive["names"] if other != name])
        broken = adaptor.evaluate(adaptor.quantize(codec.dump(alone), model, sensitive["calib"].loader(64)),
                                  evaluation)
        assert broken < fp32 - 0.05, name


def test_sensitivity_ranks_hostile_ops_first(sensitive) -> None:
    adaptor = OnnxRuntimeAdaptor({"workspace": str(sensitive["workspace"]), "threads": 1})
    model = load(adaptor, sensitive["path"])
    cfg = default_config(adaptor.query_fw_capability(model), samples=200)
    started = time.perf_counter()
    scores = adaptor.op_sensitivity(model, codec.dump(cfg), sensitive["calib"])
    assert time.perf_counter() - started < 20
    assert set(scores) == set(cfg.ops)
    ranked = sorted(scores, key=scores.get, reverse=True)
    assert set(ranked[:3]) == set(sensitive["names"]), [(n, scores[n]) for n in ranked[:5]]
    assert min(scores[n] for n in sensitive["names"]) > 100 * scores[ranked[3]]
    # an op in fp32 in the config has nothing to perturb
    fallback = adaptor.op_sensitivity(model, codec.dump(cfg.with_fallback(sensitive["names"][:1])), sensitive["calib"])
    assert fallback[sensitive["names"][0]] == 0.0


def test_sensitivity_on_cnn_is_small_everywhere(adaptor: OnnxRuntimeAdaptor, cnn_path: Path, cnn_data) -> None:
    model = load(adaptor, cnn_path)
    cfg = default_config(adaptor.query_fw_capability(model))
    scores = adaptor.op_sensitivity(model, codec.dump(cfg), cnn_data["calib"])
    assert set(scores) == set(cfg.ops)
    assert all(0 <= score < 0.01 for score in scores.values()), scores
    assert scores["conv1"] > 0
