"""`qtune tune` with the PyTorch adaptor: a small conv-bn-relu CNN trained on scikit-learn's digits
meets a 1% relative criterion, through the same local executor and trial processes as ONNX."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")

from qtune.local import tune  # noqa: E402
from qtune.spec import load_job  # noqa: E402

pytestmark = pytest.mark.torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch_models  # noqa: E402


def test_tuning_a_torch_model_meets_its_criterion(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    torch.set_num_threads(2)
    images, labels = torch_models.digits()
    order = np.random.default_rng(0).permutation(len(images))
    train, held_out = order[:1300], order[1300:]
    model = torch_models.train(torch_models.build_cnn(), images[train], labels[train])
    torch.save(model.state_dict(), tmp_path / "cnn.pt")
    np.savez(tmp_path / "calib.npz", image=images[train[:256]], labels=labels[train[:256]])
    np.savez(tmp_path / "eval.npz", image=images[held_out], labels=labels[held_out])
    job = {
        "apiVersion": "qtune.io/v1alpha1", "kind": "QuantizationJob", "metadata": {"name": "torch-cnn"},
        "spec": {
            "model": {"framework": "pytorch", "entrypoint": "torch_models:build_cnn", "weights": "cnn.pt",
                      "inputs": [{"name": "image", "shape": ["batch", 1, 8, 8]}]},
            "data": {"calibration": {"path": "calib.npz", "samples": 256},
                     "evaluation": {"path": "eval.npz", "metric": "top1"}},
            "quantization": {"approach": "auto"},
            "tuning": {"strategy": "basic", "accuracyCriterion": {"relative": 0.01}, "maxTrials": 8},
            "benchmark": {"batchSizes": [1, 32], "warmupRuns": 2, "runs": 6},
            "output": {"path": "out"},
        },
    }
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    outcome = tune(load_job(job_file), job_file)
    assert outcome.baseline.accuracy > 0.9
    assert outcome.best is not None, [(t.index, t.status, t.accuracy, t.message) for t in outcome.history.trials]
    assert outcome.best.accuracy >= outcome.baseline.accuracy * 0.99
    assert outcome.best.tune_config.quantized_ops(), "the winner quantizes nothing"
    best = json.loads((tmp_path / "out" / "best_config.json").read_text())
    assert best["tune_config"]["approach"] in ("static", "dynamic")
    published = tmp_path / "out" / "model"
    assert sorted(p.name for p in published.iterdir()) == ["model.pt", "qtune_model.json"]
    meta = json.loads((published / "qtune_model.json").read_text())  # promised beside the saved model
    assert meta["format"] == "torchscript" and meta["inputs"] == ["image"]
    assert meta["int8_ops"] and set(meta["int8_ops"]) <= set(outcome.best.tune_config.quantized_ops())
    assert set(outcome.best.tune_config.fp32_ops()) <= set(meta["fp32_ops"])
    scripted = torch.jit.load(str(published / "model.pt"))  # loads without qtune
    with torch.inference_mode():
        assert scripted(torch.from_numpy(images[held_out[:3]])).shape == (3, 10)
    assert (tmp_path / "out" / "report.html").exists()


def test_published_model_keeps_its_sidecar_files(tmp_path):
    from qtune.local.driver import _copy_model

    trial_model = tmp_path / "trials" / "3" / "model"  # where run_trial saves: the folder is the model's
    trial_model.mkdir(parents=True)
    for name in ("model.pt", "qtune_model.json", ".model-tmp.pt"):
        (trial_model / name).write_text(name)
    _copy_model(trial_model / "model.pt", tmp_path / "out1")
    assert sorted(p.name for p in (tmp_path / "out1").iterdir()) == ["model.pt", "qtune_model.json"]
    loose = tmp_path / "loose"  # a custom adaptor's file among others: its namesakes and the metadata only
    loose.mkdir()
    for name in ("int8.pt", "int8.pt.data", "qtune_model.json", "log.txt", "result.json"):
        (loose / name).write_text(name)
    _copy_model(loose / "int8.pt", tmp_path / "out2")
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["int8.pt", "int8.pt.data", "qtune_model.json"]
