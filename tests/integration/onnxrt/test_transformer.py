"""A tiny randomly initialised BERT (no download): transformer optimiser, float-min mask, int8."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from ort_helpers import default_config, load

from qtune.adaptors.onnxrt import OnnxRuntimeAdaptor
from qtune.adaptors.onnxrt.optimize import has_attention_blocks
from qtune.data import Dataset
from qtune.tuning import codec
from qtune.tuning.config import TuneConfig


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32,
                                     attn_implementation="eager")
    bert = transformers.BertModel(config).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN201
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    ids = torch.randint(0, 100, (2, 16))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Encoder().eval(), (ids, torch.ones(2, 16, dtype=torch.int64)), str(path),
                              input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                            "attention_mask": {0: "batch", 1: "seq"}},
                              opset_version=17, dynamo=False)
    except ModuleNotFoundError as exc:  # a package the exporter needs is not installed; any other error fails
        pytest.skip(f"cannot export BERT here: {exc.name} is not installed")
    return path


def token_data() -> Dataset:
    rng = np.random.default_rng(0)
    mask = np.ones((24, 16), np.int64)
    mask[:, 11:] = 0  # padding: the mask path carries the float minimum
    return Dataset({"input_ids": rng.integers(0, 100, (24, 16)).astype(np.int64), "attention_mask": mask})


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def test_bert_is_optimised_and_quantized(tmp_path: Path, bert_path: Path) -> None:
    assert has_attention_blocks(onnx.load(str(bert_path)))
    adaptor = OnnxRuntimeAdaptor({"workspace": str(tmp_path / "ws"), "threads": 1})
    model = load(adaptor, bert_path)
    capability = adaptor.query_fw_capability(model)
    optimized = adaptor.optimized(model)
    assert any(step.startswith("transformer optimizer") for step in optimized.steps), optimized.steps
    fused = {node.op_type for node in optimized.model.graph_only().graph.node}
    assert "SkipLayerNormalization" in fused
    # the extended attention mask (float minimum) is found from the constant and kept fp32
    assert any(key.startswith("tensor:") and "absurd" in note for key, note in capability["notes"].items())
    kept = [name for (name, _), entry in capability["opwise"].items() if entry["activation"]["dtype"] == ["fp32"]]
    assert any("Softmax" in name for name in kept)

    data = token_data()
    reference = adaptor.predict(model, data.loader(8))
    for approach in ("dynamic", "static"):
        cfg = default_config(capability, samples=24)
        cfg = TuneConfig(approach, cfg.format, cfg.ops, cfg.calibration_sampling_size)
        quantized = adaptor.quantize(codec.dump(cfg), model, data.loader(8))
        types = [node.op_type for node in onnx.load(str(quantized.path)).graph.node]
        assert ("MatMulInteger" if approach == "dynamic" else "QuantizeLinear") in types
        output = adaptor.predict(quantized, data.loader(8))
        assert np.isfinite(output).all()
        assert cosine(output, reference) > 0.98, approach
