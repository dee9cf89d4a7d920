"""The speed-finding benchmark cases (issue 18): the PP-OCRv4 harness (benchmarks/third_party_ocr.py and its
metric module), the contention row's CPU hog (benchmarks/tune_examples.py) and the mobile_strips example's
data and model (examples/mobile_strips/build.py)."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


sys.path.insert(0, str(ROOT / "benchmarks"))
ocr_metrics = _load("ocr_metrics", ROOT / "benchmarks" / "ocr_metrics.py")
ocr = _load("third_party_ocr", ROOT / "benchmarks" / "third_party_ocr.py")
tune_examples = _load("tune_examples", ROOT / "benchmarks" / "tune_examples.py")

CHARACTERS = ["", "a", "b", "1", " "]  # blank, the model's characters "a", "b", "1", then the space


def _probabilities(indices: list[list[int]], classes: int = len(CHARACTERS)) -> np.ndarray:
    out = np.full((len(indices), len(indices[0]), classes), 0.01, dtype=np.float32)
    for row, line in enumerate(indices):
        for column, index in enumerate(line):
            out[row, column, index] = 0.9
    return out


# --- the metric --------------------------------------------------------------------------------------
def test_ctc_greedy_decode_merges_repeats_and_drops_blanks() -> None:
    # a a _ a b b _ 1  ->  "aab1";  _ _ _ _ _ _ _ _ -> ""
    probabilities = _probabilities([[1, 1, 0, 1, 2, 2, 0, 3], [0] * 8])
    assert ocr_metrics.ctc_greedy_decode(probabilities, CHARACTERS) == ["aab1", ""]


def test_exact_match_ignores_spaces_and_bounds_what_is_left(tmp_path: Path) -> None:
    (tmp_path / "characters.txt").write_text("a\nb\n1\n", encoding="utf-8")
    metric = ocr_metrics.CtcExactMatch.__new__(ocr_metrics.CtcExactMatch)
    metric.characters = ocr_metrics.load_characters(tmp_path / "characters.txt")
    assert metric.characters == CHARACTERS
    metric.reset()
    # "a b" read as "ab" (a space is not judged), "ab1" read as "ab" (a character missing)
    metric.update(_probabilities([[1, 4, 2, 0], [1, 0, 2, 0]]), np.array(["a b", "ab1"]))
    assert metric.result() == 0.5
    assert metric.bounds(np.array(["x", "y"])) == (0.25, 0.75)


# --- the harness: data and job folder ----------------------------------------------------------------
def _fonts_or_skip() -> list[Path]:
    if not all((ocr.FONT_DIR / name).is_file() for name in ocr.FONTS):
        pytest.skip(f"Debian package {ocr.FONT_PACKAGE} not installed")
    return ocr.check_fonts()


def test_rendered_lines_are_deterministic_and_normalised_as_pp_ocr_expects() -> None:
    fonts = _fonts_or_skip()
    x, texts = ocr.make_lines(6, seed=5, fonts=fonts)
    again, texts_again = ocr.make_lines(6, seed=5, fonts=fonts)
    other, _ = ocr.make_lines(6, seed=6, fonts=fonts)
    assert x.shape == (6, 3, ocr.HEIGHT, ocr.WIDTH) and x.dtype == np.float32
    assert np.array_equal(x, again) and list(texts) == list(texts_again)
    assert not np.array_equal(x, other)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert all(text and text == text.strip() for text in texts)
    # each line: its (noisy) image from column 0, then exact zeros to width 320 (PP-OCR pads after normalising)
    padded = 0
    for line in x:
        empty = np.all(line == 0.0, axis=(0, 1))
        width = int(np.argmax(empty)) if empty.any() else ocr.WIDTH
        assert width > 0 and empty[width:].all() and not empty[:width].any()
        padded += width < ocr.WIDTH
    assert padded > 0


def _fake_wheel(path: Path) -> Path:
    """A wheel holding, at the real member path, a 1-op recogniser with a `character` table."""
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["probabilities"], axis=-1)], "rec",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 48, "w"])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", 3, 48, "w"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.metadata_props.add(key="character", value="a\nb\n1")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(ocr.MODEL_MEMBER, model.SerializeToString())
    return path


def test_prepare_writes_a_job_folder_qtune_accepts(tmp_path: Path) -> None:
    _fonts_or_skip()
    from qtune.spec import load_job

    wheel = _fake_wheel(tmp_path / "rapidocr_onnxruntime-1.4.4-py3-none-any.whl")
    job_file = ocr.prepare(tmp_path / "job", wheel, eval_count=4, calib_count=2, trials=30, timeout=900)
    job = load_job(job_file)
    assert job.spec.tuning.max_trials == 30 and job.spec.tuning.timeout_seconds == 900
    assert job.spec.tuning.accuracy_criterion.relative == 0.01
    assert sorted(job.spec.benchmark.batch_sizes) == [1, 8]
    assert job.spec.data.evaluation.metric == "ocr_metrics:CtcExactMatch"
    folder = job_file.parent
    assert (folder / "characters.txt").read_text(encoding="utf-8") == "a\nb\n1\n"
    assert (folder / "ocr_metrics.py").read_text() == (ROOT / "benchmarks" / "ocr_metrics.py").read_text()
    assert onnx.load(str(folder / "model.onnx")).metadata_props[0].key == "character"
    with np.load(folder / "eval.npz", allow_pickle=False) as data:
        assert data["x"].shape == (4, 3, 48, 320) and data["labels"].dtype.kind == "U"
    with np.load(folder / "calib.npz", allow_pickle=False) as data:
        assert data["x"].shape == (2, 3, 48, 320) and "labels" not in data


def test_op_mix_counts_compute_ops_apart_from_the_rest() -> None:
    def op(op_type: str, dtype: str) -> dict:
        tensor = {"dtype": dtype, "scheme": "asym", "granularity": "per_tensor", "algorithm": "minmax"}
        return {"op_type": op_type, "activation": tensor, **({"weight": tensor} if op_type == "Conv" else {})}

    config = {"approach": "static", "format": "QDQ",
              "ops": {"c1": op("Conv", "uint8"), "c2": op("Conv", "fp32"), "m": op("Mul", "uint8"),
                      "a": op("Add", "fp32")}}
    assert ocr.op_mix(config) == "Conv 1/2, other 1/2"


# --- the contention row's hog --------------------------------------------------------------------------
def test_cpu_hog_runs_pinned_to_one_cpu_and_stops_after() -> None:
    with tune_examples.cpu_hog(0) as pid:
        assert os.sched_getaffinity(pid) == {0}
        time.sleep(0.3)
        with open(f"/proc/{pid}/stat") as handle:
            user_ticks = int(handle.read().rsplit(")", 1)[1].split()[11])
        assert user_ticks > 0  # it burns CPU
    assert not Path(f"/proc/{pid}").exists()


# --- examples/mobile_strips ----------------------------------------------------------------------------
def test_mobile_strips_data_is_reproducible_and_labelled() -> None:
    pytest.importorskip("torch")
    build = _load("mobile_strips_build", ROOT / "examples" / "mobile_strips" / "build.py")
    glyphs = np.random.default_rng(0).random((10, 8 * 8), dtype=np.float32)
    labels = np.arange(10)
    big = build.upscale_glyphs(glyphs)
    assert big.shape == (10, build.GLYPH, build.GLYPH)
    x, text = build.strips(big, labels, 5, seed=3)
    x2, text2 = build.strips(big, labels, 5, seed=3)
    assert x.shape == (5, 1, build.CELL, build.LENGTH * build.CELL) and x.dtype == np.float32
    assert np.array_equal(x, x2) and list(text) == list(text2)
    assert all(len(t) == build.LENGTH and t.isdigit() for t in text)
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_mobile_strips_model_trains_and_exports_the_same_function() -> None:
    """Training mode uses torch's fused hard-swish/hard-sigmoid, eval mode (the export) the written-out form:
    the same function. Output: one 10-way distribution per digit position."""
    torch = pytest.importorskip("torch")
    build = _load("mobile_strips_build", ROOT / "examples" / "mobile_strips" / "build.py")
    torch.manual_seed(0)
    model = build.make_model()
    x = torch.rand(2, 1, build.CELL, build.LENGTH * build.CELL)
    model.eval()
    with torch.no_grad():
        written_out = model(x)
        for module in model.modules():  # BatchNorm keeps eval statistics; only the activations switch
            if type(module).__name__ in ("HardSwish", "HardSigmoid"):
                module.train()
        fused = model(x)
    assert written_out.shape == (2, build.LENGTH, 10)
    assert torch.allclose(written_out, fused, atol=1e-5)


def test_mobile_strips_head_carries_a_massive_activation() -> None:
    """The attention head's residual stream starts with one channel at OUTLIER (a learned position), hundreds of
    times the others: what makes an all-int8 residual Add lose the small channels beside it, while LayerNorm
    keeps the MatMuls' inputs in range."""
    torch = pytest.importorskip("torch")
    build = _load("mobile_strips_build", ROOT / "examples" / "mobile_strips" / "build.py")
    torch.manual_seed(0)
    model = build.make_model().eval()
    position = model.position.detach()[0]
    others = position[:, [c for c in range(build.HEAD_DIM) if c != build.OUTLIER_CHANNEL]]
    assert float(position[:, build.OUTLIER_CHANNEL].min()) == build.OUTLIER
    assert float(others.abs().max()) == 0.0
    captured = {}
    model.attention[0].norm1.register_forward_hook(lambda module, args, out: captured.update(x=args[0]))
    with torch.no_grad():
        model(torch.rand(2, 1, build.CELL, build.LENGTH * build.CELL))
    stream = captured["x"].abs().amax(dim=(0, 1))
    median = float(stream.median())
    assert float(stream[build.OUTLIER_CHANNEL]) > 50 * median, (float(stream[build.OUTLIER_CHANNEL]), median)
