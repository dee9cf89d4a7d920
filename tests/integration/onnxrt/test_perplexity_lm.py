"""Perplexity through the ONNX Runtime adaptor on a real text (issue 22, part 4).

The language model is a character bigram model factorised into an embedding (Gather) and a projection
(MatMul + Add), as a decoder's first and last layers are, fitted in closed form (a rank-24 SVD of the
smoothed log-probability table) on CPython's own documentation text (`pydoc_data.topics`, shipped with every
CPython), and scored on a held-out part of the same text. Its fp32 perplexity through the adaptor must equal a
plain numpy evaluation of the same weights; int8 must move it a little and stay close."""

from __future__ import annotations

import re
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from ort_helpers import default_config, load

from qtune.adaptors.onnxrt import OnnxRuntimeAdaptor
from qtune.data import Dataset
from qtune.data.metrics import Perplexity
from qtune.tuning import codec

RANK = 24
WINDOW = 32


def _text() -> tuple[np.ndarray, int]:
    text = re.sub(r"[^a-z .,()\n]", "?", " ".join(topics[key] for key in sorted(topics)).lower())[:120_000]
    alphabet = sorted(set(text))
    return np.array([alphabet.index(c) for c in text], np.int64), len(alphabet)


def _fit(ids: np.ndarray, vocabulary: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    counts = np.ones((vocabulary, vocabulary))
    np.add.at(counts, (ids[:-1], ids[1:]), 1.0)
    log_probs = np.log(counts / counts.sum(axis=1, keepdims=True))
    bias = log_probs.mean(axis=0)
    u, s, vt = np.linalg.svd(log_probs - bias, full_matrices=False)
    embedding = (u[:, :RANK] * np.sqrt(s[:RANK])).astype(np.float32)
    projection = (np.sqrt(s[:RANK])[:, None] * vt[:RANK]).astype(np.float32)
    return embedding, projection, bias.astype(np.float32)


def _windows(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    count = (len(ids) - 1) // WINDOW
    inputs = ids[:count * WINDOW].reshape(count, WINDOW)
    labels = ids[1:count * WINDOW + 1].reshape(count, WINDOW).copy()
    labels[:, :4] = -100  # the first positions of a window are not scored (a prompt), as a decoder's would not be
    return inputs, labels


def _model(path: Path, embedding: np.ndarray, projection: np.ndarray, bias: np.ndarray) -> None:
    nodes = [helper.make_node("Gather", ["embedding", "ids"], ["hidden"]),
             helper.make_node("MatMul", ["hidden", "projection"], ["scores"]),
             helper.make_node("Add", ["scores", "bias"], ["logits"])]
    graph = helper.make_graph(
        nodes, "bigram", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", WINDOW])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", WINDOW, len(bias)])],
        [numpy_helper.from_array(embedding, "embedding"), numpy_helper.from_array(projection, "projection"),
         numpy_helper.from_array(bias, "bias")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


def test_perplexity_of_a_language_model_fp32_and_int8(adaptor: OnnxRuntimeAdaptor, tmp_path: Path) -> None:
    ids, vocabulary = _text()
    split = int(0.8 * len(ids))
    embedding, projection, bias = _fit(ids[:split], vocabulary)
    _model(tmp_path / "lm.onnx", embedding, projection, bias)
    calib_inputs, calib_labels = _windows(ids[:split][:WINDOW * 64 + 1])
    eval_inputs, eval_labels = _windows(ids[split:])

    logits = embedding[eval_inputs] @ projection + bias  # the same model in numpy
    expected = Perplexity()
    expected.update(logits, eval_labels)
    unigram = np.bincount(ids[:split], minlength=vocabulary) / split
    scored = eval_labels[eval_labels >= 0]
    unigram_perplexity = float(np.exp(-np.mean(np.log(unigram[scored]))))

    model = load(adaptor, tmp_path / "lm.onnx")
    fp32 = adaptor.evaluate(model, Dataset({"ids": eval_inputs}, eval_labels).loader(16), metric=Perplexity())
    assert fp32 == pytest.approx(expected.result(), rel=1e-4)
    assert fp32 < 0.8 * unigram_perplexity < vocabulary  # it learned which character follows which

    config = default_config(adaptor.query_fw_capability(model), samples=len(calib_inputs))
    quantized = adaptor.quantize(codec.dump(config), model,
                                 Dataset({"ids": calib_inputs}, calib_labels).loader(16))
    int8 = adaptor.evaluate(quantized, Dataset({"ids": eval_inputs}, eval_labels).loader(16), metric=Perplexity())
    assert int8 != fp32 and int8 == pytest.approx(fp32, rel=0.05), (fp32, int8)


def test_weight_only_takes_the_embedding_in_4_bits(tmp_path: Path) -> None:
    """approach weight_only: the embedding Gather becomes GatherBlockQuantized (4 bits only: ORT refuses 8), the
    projection MatMulNBits; both sensitivity measures see the embedding; perplexity stays close."""
    from qtune.adaptors.onnxrt.sensitivity import op_sensitivity
    from qtune.adaptors.onnxrt.weight_only_sensitivity import output_errors
    from qtune.spec.models import QuantizationSpec
    from qtune.tuning.space import build_space

    ids, vocabulary = _text()
    split = int(0.8 * len(ids))
    _model(tmp_path / "lm.onnx", *_fit(ids[:split], vocabulary))
    eval_inputs, eval_labels = _windows(ids[split:])
    adaptor = OnnxRuntimeAdaptor({"workspace": str(tmp_path / "ws"), "threads": 1,
                                  "quantization": {"approach": "weight_only"}})
    capability = adaptor.query_fw_capability(tmp_path / "lm.onnx")
    gather = next(entry for (_, op_type), entry in capability["opwise"].items() if op_type == "Gather")
    assert gather["weight"]["dtype"] == ["int4", "fp32"] and gather["activation"]["dtype"] == ["fp32"]
    config = build_space(capability, QuantizationSpec(approach="weight_only"), [], 100).default_config()
    assert sorted(config.ops[name].op_type for name in config.quantized_ops()) == ["Gather", "MatMul"]

    model = load(adaptor, tmp_path / "lm.onnx")
    quantized = adaptor.quantize(codec.dump(config), model, None)
    assert sorted(node.op_type for node in onnx.load(str(quantized.path)).graph.node) == [
        "Add", "GatherBlockQuantized", "MatMulNBits"]
    def weight_bytes(path: Path) -> int:
        return sum(init.ByteSize() for init in onnx.load(str(path)).graph.initializer)  # as stored

    assert weight_bytes(quantized.path) < 0.3 * weight_bytes(tmp_path / "lm.onnx")
    fp32 = adaptor.evaluate(model, Dataset({"ids": eval_inputs}, eval_labels).loader(16), metric=Perplexity())
    int4 = adaptor.evaluate(quantized, Dataset({"ids": eval_inputs}, eval_labels).loader(16), metric=Perplexity())
    assert fp32 < int4 < 1.05 * fp32, (fp32, int4)

    optimized = adaptor.optimized(model).model
    gather_name = next(name for name, op in config.ops.items() if op.op_type == "Gather")
    whole = output_errors(optimized, config, {"ids": eval_inputs[:8]}, None)
    local = op_sensitivity(optimized.path, config, {"ids": eval_inputs[:8]})
    assert whole[gather_name] > 0 and local[gather_name] > 0, (whole, local)
