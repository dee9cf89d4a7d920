"""A generated ONNX model with many quantizable ops: a chain of `n` MatMul nodes on a [batch, 4] input
(4x4 weights, near identity, so the output stays bounded), plus calibration and evaluation data.

Small in bytes (2,000 MatMuls: ~150 KB), large in ops: its tune config names every op, so it is
far larger than what one command-line argument may hold (Linux: 128 KiB) — the config must reach a
pod as a file."""

from __future__ import annotations

from pathlib import Path

WIDTH = 4


def build(folder: Path, n: int = 2000, samples: int = 8, seed: int = 0) -> dict[str, Path]:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "x"
    for i in range(n):
        weight = (np.eye(WIDTH) + rng.normal(0, 0.01, (WIDTH, WIDTH))).astype(np.float32)
        weight /= np.abs(np.linalg.eigvals(weight)).max()  # keep the chain's gain at about 1
        inits.append(numpy_helper.from_array(weight.astype(np.float32), f"w{i}"))
        out = "y" if i == n - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [out], name=f"/mm{i}/MatMul"))
        current = out
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="qtune-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"model": folder / "chain.onnx", "calib": folder / "chain-calib.npz", "eval": folder / "chain-eval.npz"}
    onnx.save(model, str(paths["model"]))
    x = rng.normal(0, 1, (samples, WIDTH)).astype(np.float32)
    np.savez(paths["calib"], x=x)
    np.savez(paths["eval"], x=x)  # no labels: mse against the fp32 outputs
    return paths


def job_spec(paths: dict[str, Path], claim: str) -> dict:
    """One trial of the default int8 config (every op quantized), judged by the MSE to fp32 (no labels
    needed, no benchmark: objective size)."""
    return {
        "model": {"framework": "onnxruntime", "path": paths["model"].name},
        "data": {"calibration": {"path": paths["calib"].name, "samples": 8},
                 "evaluation": {"path": paths["eval"].name, "metric": "mse"}},
        "quantization": {"approach": "static", "format": "QDQ"},
        "tuning": {"strategy": "exhaustive", "accuracyCriterion": {"absolute": 1000.0, "higherIsBetter": False},
                   "objective": "size", "maxTrials": 1, "parallelTrials": 1, "seed": 0},
        "benchmark": {"batchSizes": [1], "warmupRuns": 1, "runs": 1, "maxSeconds": 3, "minRounds": 3},
        "trial": {"resources": {"cpu": 1, "memory": "4Gi"}},
        "workspace": {"persistentVolumeClaim": claim},
    }
