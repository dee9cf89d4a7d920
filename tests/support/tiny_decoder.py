"""A tiny decoder language model with a KV cache (d_model 64, 2 heads, one layer) as ONNX, and a job around it:
what the decode-speed tests (spec.benchmark.decode) run through real ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

from qtune.runner.context import JobContext
from qtune.spec.load import load_job

D, HEADS, VOCABULARY, WINDOW = 64, 2, 40, 24
PAST = ["batch", HEADS, "past", D // HEADS]


def decoder(path: Path, seed: int = 0) -> None:
    """input_ids -> embedding -> keys and values appended to the cache; the logits read the mean cached value,
    so every step depends on its past."""
    rng = np.random.default_rng(seed)
    weights = {name: rng.normal(0, 0.2, shape).astype(np.float32)
               for name, shape in (("embed", (VOCABULARY, D)), ("wk", (D, D)), ("wv", (D, D)),
                                   ("head", (D, VOCABULARY)))}
    split = np.array([0, 0, HEADS, D // HEADS], np.int64)
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["x"])]
    for part in ("k", "v"):
        nodes += [helper.make_node("MatMul", ["x", f"w{part}"], [f"{part}_flat"]),
                  helper.make_node("Reshape", [f"{part}_flat", "split"], [f"{part}_heads"]),
                  helper.make_node("Transpose", [f"{part}_heads"], [f"{part}_new"], perm=[0, 2, 1, 3]),
                  helper.make_node("Concat", [f"past_key_values.0.{'key' if part == 'k' else 'value'}",
                                              f"{part}_new"], [f"present.0.{'key' if part == 'k' else 'value'}"],
                                   axis=2)]
    nodes += [helper.make_node("ReduceMean", ["present.0.value"], ["context"], axes=[2], keepdims=0),
              helper.make_node("Reshape", ["context", "flat"], ["context_flat"]),
              helper.make_node("Unsqueeze", ["context_flat", "one"], ["context_row"]),
              helper.make_node("Add", ["x", "context_row"], ["mixed"]),
              helper.make_node("MatMul", ["mixed", "head"], ["logits"])]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])]
    inputs += [helper.make_tensor_value_info(f"past_key_values.0.{kind}", TensorProto.FLOAT, PAST)
               for kind in ("key", "value")]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", VOCABULARY])]
    outputs += [helper.make_tensor_value_info(f"present.0.{kind}", TensorProto.FLOAT,
                                              ["batch", HEADS, "total", D // HEADS]) for kind in ("key", "value")]
    constants = [numpy_helper.from_array(value, name) for name, value in weights.items()]
    constants += [numpy_helper.from_array(split, "split"), numpy_helper.from_array(np.array([0, D], np.int64), "flat"),
                  numpy_helper.from_array(np.array([1], np.int64), "one")]
    graph = helper.make_graph(nodes, "tiny_decoder", inputs, outputs, constants)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def plain(path: Path) -> None:
    """A model without a cache: input_ids -> logits."""
    weights = np.random.default_rng(1).normal(0, 0.2, (VOCABULARY, VOCABULARY)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gather", ["table", "input_ids"], ["logits"])], "plain",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence",
                                                                                            VOCABULARY])],
                              [numpy_helper.from_array(weights, "table")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def write_job(folder: Path, model: str, benchmark: dict, **spec_extra: object) -> Path:
    """data.npz and job.yaml for `model` in `folder`: perplexity on 8 random windows; `benchmark` added."""
    ids = np.random.default_rng(2).integers(0, VOCABULARY, (8, WINDOW + 1))
    past = {f"past_key_values.0.{kind}": np.zeros((8, HEADS, 0, D // HEADS), np.float32) for kind in ("key", "value")}
    data = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    if model != "plain.onnx":
        data.update(past)
    np.savez(folder / "data.npz", **data)
    spec = {"apiVersion": "qtune.io/v1alpha1", "kind": "QuantizationJob", "metadata": {"name": "decode"},
            "spec": {"model": {"framework": "onnxruntime", "path": model},
                     "data": {"calibration": {"path": "data.npz"},
                              "evaluation": {"path": "data.npz", "metric": "perplexity", "output": "logits"}},
                     "benchmark": {"warmupRuns": 2, "runs": 10, "minRounds": 3, "maxSeconds": 2, "threads": 1,
                                   **benchmark},
                     "output": {"path": str(folder / "out")}, **spec_extra}}
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    return folder / "job.yaml"


def job_context(folder: Path, model: str, benchmark: dict) -> JobContext:
    """The JobContext of `write_job` (one thread)."""
    return JobContext(load_job(write_job(folder, model, benchmark)), folder, folder / "workspace", threads=1)


