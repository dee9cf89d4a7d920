"""The speed half of the promise, on real ONNX Runtime models and real measurements:

- a model where no int8 config beats fp32 ends in the honest outcome (NoSpeedup), never GoalReached;
- the winner's speedup is ONE figure: console, report.md/html, best_config.json and history.json
  agree, and the latencies printed beside it divide to it;
- with objective latency, sequential, parallel and resumed runs return the same winner.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from qtune.cli.main import EXIT_NO_SPEEDUP
from qtune.cli.main import main as qtune_main
from qtune.local import tune
from qtune.protocol import SpeedMeasurement
from qtune.report.report import speed_sentence
from qtune.spec import load_job

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE / "onnxrt"))
sys.path.insert(0, str(HERE))

from onnx_builders import INPUT, digits, mlp_proto, save  # noqa: E402
from sensitive_model import build_sensitive_mlp  # noqa: E402

FAST_BENCHMARK = {"maxSeconds": 4, "minRounds": 5, "warmupRuns": 3, "runs": 20}


def _job(folder: Path, name: str, model: Path, calib: Path, evaluation: Path, batch_sizes: list[int],
         **tuning: object) -> Path:
    document = {
        "apiVersion": "qtune.io/v1alpha1", "kind": "QuantizationJob", "metadata": {"name": name},
        "spec": {
            "model": {"framework": "onnxruntime", "path": str(model)},
            "data": {"calibration": {"path": str(calib)}, "evaluation": {"path": str(evaluation)}},
            "tuning": {"accuracyCriterion": {"relative": 0.02}, "maxTrials": 6, **tuning},
            "benchmark": {"batchSizes": batch_sizes, **FAST_BENCHMARK},
            "output": {"path": "out"},
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture(scope="module")
def tiny_mlp(tmp_path_factory):
    """64 -> 8 -> 10 on digits: so small that Q/DQ costs more than int8 saves at batch 1."""
    folder = tmp_path_factory.mktemp("tiny")
    data = digits()
    np.savez(folder / "calib.npz", **{INPUT: data["x_train"][:100]})
    np.savez(folder / "eval.npz", **{INPUT: data["x_eval"], "labels": data["y_eval"]})
    return save(mlp_proto(hidden=(8,)), folder / "tiny.onnx"), folder / "calib.npz", folder / "eval.npz"


def test_no_int8_config_faster_than_fp32_ends_in_no_speedup(tiny_mlp, tmp_path, capsys):
    job_file = _job(tmp_path, "tiny", *tiny_mlp, batch_sizes=[1])
    assert qtune_main(["tune", str(job_file)]) == EXIT_NO_SPEEDUP
    console = capsys.readouterr().err
    assert "NoSpeedup" in console and "GoalReached" not in console
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert history["outcome"] == "NoSpeedup" and history["stop_reason"] != "GoalReached"
    best = json.loads((tmp_path / "out" / "best_config.json").read_text())
    assert best["outcome"] == "NoSpeedup" and best["speed"]["high"] < 1.0, best["speed"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "NoSpeedup" in report
    # a slower config reads slower, in the report and on the console: never "0.76× faster"
    assert f"{1 / best['speed']['speedup']:.2f}× slower than fp32" in report and "× faster" not in report
    assert "slower than fp32" in console
    # the passing config and its figures are still written, for whoever wants them
    assert any((tmp_path / "out" / "model").iterdir())


def _numbers(pattern: str, text: str) -> list[float]:
    return [float(x) for x in re.findall(pattern, text)]


def test_one_speedup_everywhere(tmp_path, capsys):
    source = ROOT / "examples" / "digits"
    if not (source / "model.onnx").exists():
        import subprocess

        subprocess.run([sys.executable, str(source / "build.py")], check=True, timeout=600)
    for name in ("model.onnx", "calib.npz", "eval.npz"):
        shutil.copy(source / name, tmp_path / name)
    job_file = _job(tmp_path, "digits", tmp_path / "model.onnx", tmp_path / "calib.npz", tmp_path / "eval.npz",
                    batch_sizes=[1, 64])
    code = qtune_main(["tune", str(job_file)])
    console = re.sub(r"\s+", " ", capsys.readouterr().err)
    out = tmp_path / "out"
    best = json.loads((out / "best_config.json").read_text())
    history = json.loads((out / "history.json").read_text())
    speed = best["speed"]
    assert code in (0, EXIT_NO_SPEEDUP) and speed["batch_size"] == 64
    # the latencies printed beside the speedup come from the same measurement
    assert speed["fp32_p50_ms"] / speed["p50_ms"] == pytest.approx(speed["speedup"], rel=1e-9)
    assert speed["low"] <= speed["speedup"] <= speed["high"]
    # history.json holds the same figure (the confirmation's, which decided)
    assert history["confirmation"]["speed"][str(best["trial"])]["64"] == speed
    shown = f"{speed['speedup']:.2f}× [{speed['low']:.2f}–{speed['high']:.2f}]"
    verdict = re.sub(r"\s+", " ", best["verdict"])
    assert verdict in console, (verdict, console[-1500:])  # the console's last word is best_config's
    report = (out / "report.md").read_text()
    # in words that say slower when it is slower (never "0.76× faster")
    assert f"fp32 {speed['fp32_p50_ms']:.3f} ms → int8 {speed['p50_ms']:.3f} ms: " \
           f"{speed_sentence(SpeedMeasurement.model_validate(speed))}" in report
    # the front lists the winner with the same figure
    front = {e["trial"]: e for e in history["front"]["entries"]}
    if best["trial"] in front:
        assert front[best["trial"]]["speed"] == speed and front[best["trial"]]["winner"]
    assert f"[{speed['low']:.2f}–{speed['high']:.2f}]" in report
    assert f"{speed['speedup']:.2f}×" in (out / "report.html").read_text()
    assert best["verdict"].startswith(best["outcome"]) and shown in best["verdict"]


def test_latency_winner_is_the_same_sequential_parallel_and_resumed(tmp_path):
    model, calib, evaluation, _ = build_sensitive_mlp(tmp_path / "model")

    # minSpeedup far below any measured speedup: the search's course then depends on accuracy alone. (With
    # the default 1.0, whether the first passing config is "fast enough" is decided by a speed interval
    # close to 1 here, so the speed stage runs in one run and not in another: a measurement, not a decision.)
    def job(name: str, **tuning: object) -> Path:
        return _job(tmp_path / name, "mlp", Path(model), Path(calib), Path(evaluation), batch_sizes=[16],
                    **{"objective": "latency", "maxTrials": 12, "minSpeedup": 0.05, **tuning})

    sequential = tune(load_job(job("seq")), job("seq"))
    parallel = tune(load_job(job("par", parallelTrials=2)), job("par", parallelTrials=2))
    assert sequential.best is not None and parallel.best is not None
    # a parallel wave may add trials a sequential run did not need, never different decisions
    assert {t.config_key for t in sequential.history.trials if t.passed} <= \
        {t.config_key for t in parallel.history.trials if t.passed}
    # interrupted after 2 trials (a smaller budget), then resumed with the full one
    short = job("res", maxTrials=2)
    tune(load_job(short), short)
    full = job("res")
    resumed = tune(load_job(full), full, resume=True)
    keys = [t.config_key for t in resumed.history.trials]
    assert len(keys) == len(set(keys))
    winners = {sequential.best.config_key, parallel.best.config_key, resumed.best.config_key}
    assert len(winners) == 1, [(o.best.index, o.speed) for o in (sequential, parallel, resumed)]
