"""Calibration statistics are measured once per job and algorithm, whatever the process."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
from ort_helpers import default_config, load, set_op

from qtune.adaptors.onnxrt import OnnxRuntimeAdaptor
from qtune.tuning import codec

FC0, FC1 = "fc0/MatMul/MatMulAddFusion", "fc1/MatMul/MatMulAddFusion"


def cache_files(workspace: Path) -> list[Path]:
    return sorted((workspace / "calibration").glob("*.json"))


def test_second_config_does_not_recalibrate(tmp_path: Path, mlp_path: Path, mlp_data) -> None:
    workspace = tmp_path / "ws"
    first = OnnxRuntimeAdaptor({"workspace": str(workspace)})
    model = load(first, mlp_path)
    cfg = default_config(first.query_fw_capability(model))

    first.quantize(codec.dump(cfg), model, mlp_data["calib"].loader(32))
    assert first.timings["calibration"] > 0
    assert set(first.timings) == {"calibration", "quantize"}
    files = cache_files(workspace)
    assert len(files) == 1 and "-minmax-n100" in files[0].name
    stamps = [f.stat().st_mtime_ns for f in files]

    other = set_op(cfg, FC1, activation={"dtype": "int8"}).with_fallback([FC0])
    first.quantize(codec.dump(other), model, mlp_data["calib"].loader(50))  # other batching, same samples
    assert first.timings["calibration"] == 0.0
    assert cache_files(workspace) == files and [f.stat().st_mtime_ns for f in files] == stamps

    # a new adaptor (e.g. another trial process) reuses the file too
    second = OnnxRuntimeAdaptor({"workspace": str(workspace)})
    third_cfg = set_op(cfg, FC0, weight={"granularity": "per_tensor"})
    second.quantize(codec.dump(third_cfg), load(second, mlp_path), mlp_data["calib"].loader(32))
    assert second.timings["calibration"] == 0.0
    assert cache_files(workspace) == files

    # a new algorithm is measured once, then reused
    kl = set_op(cfg, FC1, activation={"algorithm": "kl"})
    second.quantize(codec.dump(kl), model, mlp_data["calib"].loader(32))
    assert second.timings["calibration"] > 0
    assert len(cache_files(workspace)) == 2
    kl_again = set_op(kl, FC0, activation={"dtype": "int8"})
    OnnxRuntimeAdaptor({"workspace": str(workspace)}).quantize(codec.dump(kl_again), model,
                                                               mlp_data["calib"].loader(32))
    assert len(cache_files(workspace)) == 2

    # other calibration data, or another sample count, is another measurement
    fewer = default_config(first.query_fw_capability(model), samples=60)
    first.quantize(codec.dump(fewer), model, mlp_data["calib"].loader(32))
    assert first.timings["calibration"] > 0
    assert len(cache_files(workspace)) == 3


def test_trial_record_and_merged_ranges(adaptor: OnnxRuntimeAdaptor, mlp_path: Path, mlp_data) -> None:
    model = load(adaptor, mlp_path)
    cfg = set_op(default_config(adaptor.query_fw_capability(model)), FC1, activation={"algorithm": "percentile"})
    quantized = adaptor.quantize(codec.dump(cfg), model, mlp_data["calib"].loader(32))
    folder = quantized.path.parent
    assert (folder / "calibration.json").is_file(), "the merged per-trial ranges handed to quantize_static"
    record = adaptor.last_quantization
    assert record["identity"]["config"] == cfg.key()
    assert record["timings"] == adaptor.timings
    # the same config again: the quantized model is reused from the workspace
    again = adaptor.quantize(codec.dump(cfg), model, mlp_data["calib"].loader(32))
    assert again.path == quantized.path and adaptor.timings == {"calibration": 0.0, "quantize": 0.0}


def _quantize_in_process(workspace: str, model_path: str, variant: int, queue: multiprocessing.Queue) -> None:
    import sys

    sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]
    import onnx_builders as builders
    from ort_helpers import default_config as default
    from ort_helpers import set_op as set_one

    from qtune.data import Dataset

    adaptor = OnnxRuntimeAdaptor({"workspace": workspace, "threads": 1})
    model = adaptor.load_model({"path": model_path})
    cfg = set_one(default(adaptor.query_fw_capability(model)), FC1, activation={"algorithm": "kl"})
    if variant:  # two different trials that need the same statistics
        cfg = set_one(cfg, FC0, activation={"dtype": "int8"})
    data = builders.digits()
    calib = Dataset(builders.mlp_input(data["x_train"][:100]))
    adaptor.quantize(codec.dump(cfg), model, calib.loader(32))
    queue.put(adaptor.last_quantization["calibration"])


@pytest.mark.slow
def test_concurrent_trials_calibrate_once(tmp_path: Path, mlp_path: Path) -> None:
    workspace = tmp_path / "shared"
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_quantize_in_process, args=(str(workspace), str(mlp_path), variant, queue))
               for variant in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=240)
        assert worker.exitcode == 0
    logs = [queue.get(timeout=5) for _ in workers]
    names = [f.name for f in cache_files(workspace)]
    assert len(names) == 2, names
    assert len(list((workspace / "optimized").glob("*/model.onnx"))) == 1
    for algorithm in ("minmax", "kl"):
        states = sorted(log[algorithm] for log in logs)
        assert states == ["cached", "measured"], f"{algorithm} must be measured by exactly one trial: {logs}"
