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
    assert outcome.best.config.quantized_ops(), "the winner quantizes nothing"
    best = json.loads((tmp_path / "out" / "best_config.json").read_text())
    assert best["tune_config"]["approach"] in ("static", "dynamic")
    assert any((tmp_path / "out" / "model").iterdir())
    assert (tmp_path / "out" / "report.html").exists()
