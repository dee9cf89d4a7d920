"""Every bad input stops `qtune tune` with ONE line naming the field and what is allowed, never a traceback.

The table below has rows per framework (ONNX Runtime and PyTorch). Most rows run the CLI in-process
(`qtune.cli.main.main`); the rows marked `subprocess` run the real `qtune tune` command. The models
are tiny and built in code (no training), so each row fails within the baseline step in seconds.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from tiny_onnx import save_tiny_classifier

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from qtune.cli.main import main as qtune_main  # noqa: E402

ANSI = "\x1b["

TINY_MODULE = textwrap.dedent('''
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(4, 16)
            self.fc2 = torch.nn.Linear(16, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    def build():
        torch.manual_seed(0)
        return Tiny()

    def broken():
        raise RuntimeError("no weights here")

    def other_shape():
        return torch.nn.Linear(5, 3)
''')

USER_MODULE = textwrap.dedent('''
    import numpy as np

    class Accuracy:
        def __init__(self):
            self.reset()
        def reset(self):
            self.hits, self.count = 0, 0
        def update(self, preds, labels):
            self.hits += int((preds.argmax(1) == labels).sum()); self.count += len(labels)
        def result(self):
            return self.hits / max(self.count, 1)

    class LowerIsBetter(Accuracy):
        higher_is_better = False

    class Exploding(Accuracy):
        def update(self, preds, labels):
            raise KeyError("position")

    class NoResult:
        def update(self, preds, labels):
            pass

    def not_a_number(model):
        return "high"

    def data_with_a_typo():
        return {"x": np.zeros((4, 4), np.float32)}
''')


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad-inputs")
    rng = np.random.default_rng(0)
    w1, w2 = save_tiny_classifier(root / "model.onnx", rng)
    x = rng.normal(size=(48, 4)).astype(np.float32)
    y = (np.maximum(x @ w1, 0) @ w2).argmax(1)
    np.savez(root / "calib.npz", x=x)
    np.savez(root / "eval.npz", x=x, labels=y)
    np.savez(root / "no_labels.npz", x=x)
    np.savez(root / "wrong_name.npz", image=x, labels=y)
    np.savez(root / "float64.npz", x=x.astype(np.float64), labels=y)
    np.savez(root / "strings.npz", x=x, labels=np.array([f"class-{v}" for v in y]))
    np.savez(root / "onehot.npz", x=x, labels=np.eye(3)[y])
    np.save(root / "objects.npy", np.array([{"a": 1}], dtype=object))
    np.savez(root / "pickled.npz", x=np.array([{"a": 1}] * 48, dtype=object), labels=y)
    (root / "garbage.onnx").write_bytes(b"definitely not a protobuf")
    (root / "tiny_torch.py").write_text(TINY_MODULE)
    (root / "user_code.py").write_text(USER_MODULE)
    sys.path.insert(0, str(root))
    import tiny_torch  # noqa: PLC0415 - built just above

    torch.save(tiny_torch.build(), root / "pickled.pt")
    torch.save(tiny_torch.build(), root / "pickled.pt2")
    torch.save(tiny_torch.build().state_dict(), root / "weights.pt")
    sys.path.remove(str(root))
    for name in ("tiny_torch", "user_code"):  # another test's module of the same name may be imported
        sys.modules.pop(name, None)
    return root


BASE: dict[str, Any] = {
    "apiVersion": "qtune.io/v1alpha1", "kind": "QuantizationJob", "metadata": {"name": "bad"},
    "spec": {"model": {"framework": "onnxruntime", "path": "model.onnx"},
             "data": {"calibration": {"path": "calib.npz"}, "evaluation": {"path": "eval.npz"}},
             "tuning": {"maxTrials": 1}, "benchmark": {"batchSizes": [1], "warmupRuns": 0, "runs": 2}}}
TORCH = {"framework": "pytorch", "entrypoint": "tiny_torch:build"}


def job(folder: Path, name: str, edits: dict[str, Any]) -> Path:
    document = copy.deepcopy(BASE)
    document["metadata"]["name"] = name
    for path, value in edits.items():
        node = document["spec"]
        *parents, last = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    target = folder / f"{name}.yaml"
    target.write_text(yaml.safe_dump(document))
    return target


# (id, framework, edits, field named in the message, other words it must contain, words it must not contain)
ROWS: list[tuple[str, str, dict[str, Any], str, tuple[str, ...], tuple[str, ...]]] = [
    # --- ONNX Runtime ---------------------------------------------------------------------------
    ("ort-eval-without-labels", "onnxruntime", {"data.evaluation.path": "no_labels.npz"},
     "spec.data.evaluation", ("'labels'", "top1"), ()),
    ("ort-adaptor-not-importable", "onnxruntime", {"model.framework": "no_such_package.adaptors:Mine"},
     "spec.model.framework", ("no_such_package", "allowed"), ()),
    ("ort-adaptor-class-missing", "onnxruntime", {"model.framework": "user_code:MyAdaptor"},
     "spec.model.framework", ("it has", "Accuracy"), ()),
    ("ort-adaptor-not-an-adaptor", "onnxruntime", {"model.framework": "user_code:Accuracy"},
     "spec.model.framework", ("not a qtune Adaptor",), ()),
    ("ort-string-labels-with-top1", "onnxruntime", {"data.evaluation.path": "strings.npz"},
     "spec.data.evaluation.metric", ("top1", "module:Name"), ()),
    ("ort-onehot-labels", "onnxruntime", {"data.evaluation.path": "onehot.npz"},
     "spec.data.evaluation.metric", ("one class index per sample",), ()),
    ("ort-metric-name-missing", "onnxruntime", {"data.evaluation.metric": "user_code:Acuracy"},
     "spec.data.evaluation.metric", ("it has", "Accuracy", "LowerIsBetter"), ()),
    ("ort-metric-module-missing", "onnxruntime", {"data.evaluation.metric": "metrics_nowhere:F"},
     "spec.data.evaluation.metric", ("metrics_nowhere",), ()),
    ("ort-metric-without-result", "onnxruntime", {"data.evaluation.metric": "user_code:NoResult"},
     "spec.data.evaluation.metric", ("result",), ()),
    ("ort-metric-raises", "onnxruntime", {"data.evaluation.metric": "user_code:Exploding"},
     "spec.data.evaluation.metric", ("Exploding.update raised KeyError",), ()),
    ("ort-metric-direction-conflict", "onnxruntime", {"data.evaluation.metric": "user_code:LowerIsBetter"},
     "spec.tuning.accuracyCriterion.higherIsBetter", ("higher_is_better = False",), ()),
    ("ort-builtin-direction-conflict", "onnxruntime",
     {"data.evaluation.metric": "mse", "tuning.accuracyCriterion": {"higherIsBetter": True}},
     "spec.tuning.accuracyCriterion.higherIsBetter", ("mse", "allowed: false"), ()),
    ("ort-unknown-metric", "onnxruntime", {"data.evaluation.metric": "accuracy"},
     "spec.data.evaluation.metric", ("top1", "module:Name"), ()),
    ("ort-evalfunc-not-a-number", "onnxruntime",
     {"data.evaluation": {"evalFunc": "user_code:not_a_number"}},
     "spec.data.evaluation.evalFunc", ("must return a number",), ()),
    ("ort-evalfunc-and-metric", "onnxruntime",
     {"data.evaluation": {"evalFunc": "user_code:not_a_number", "metric": "top1", "path": "eval.npz"}},
     "spec.data.evaluation", ("either metric or evalFunc",), ()),
    ("ort-calibration-lacks-input", "onnxruntime", {"data.calibration.path": "wrong_name.npz"},
     "spec.data.calibration", ("['x']", "image"), ("labels",)),
    ("ort-calibration-float64", "onnxruntime", {"data.calibration.path": "float64.npz"},
     "spec.data.calibration", ("float32", "float64"), ("labels",)),
    ("ort-pickled-npz", "onnxruntime", {"data.evaluation.path": "pickled.npz"},
     "spec.data.evaluation", ("pickled",), ()),
    ("ort-npy-not-npz", "onnxruntime", {"data.evaluation.path": "objects.npy"},
     "spec.data.evaluation", ("objects.npy",), ()),
    ("ort-model-missing", "onnxruntime", {"model.path": "nowhere.onnx"},
     "spec.model.path", ("nowhere.onnx", "relative"), ()),
    ("ort-model-garbage", "onnxruntime", {"model.path": "garbage.onnx"},
     "spec.model.path", ("not a valid ONNX",), ()),
    ("ort-unknown-input-declared", "onnxruntime", {"model.inputs": [{"name": "y"}]},
     "spec.model.inputs", ("['x']",), ()),
    ("ort-data-entrypoint-typo", "onnxruntime", {"data.evaluation": {"entrypoint": "user_code:data_with_typo"}},
     "spec.data.evaluation.entrypoint", ("data_with_a_typo",), ()),
    ("ort-data-entrypoint-returns-dict", "onnxruntime",
     {"data.evaluation": {"entrypoint": "user_code:data_with_a_typo"}},
     "spec.data.evaluation", ("(inputs, labels)",), ()),
    ("ort-strategy-not-importable", "onnxruntime", {"tuning.strategy": "no_such_strategies:Mine"},
     "spec.tuning.strategy", ("no_such_strategies",), ()),
    # --- PyTorch ----------------------------------------------------------------------------------
    ("torch-eval-without-labels", "pytorch", {"model": TORCH, "data.evaluation.path": "no_labels.npz"},
     "spec.data.evaluation", ("'labels'",), ()),
    ("torch-float64-inputs", "pytorch",
     {"model": TORCH, "data.calibration.path": "float64.npz", "data.evaluation.path": "float64.npz"},
     "spec.data.calibration", ("float64", "float32", "spec.model.inputs"), ()),
    ("torch-float64-evaluation", "pytorch", {"model": TORCH, "data.evaluation.path": "float64.npz"},
     "spec.data.evaluation", ("float64", "float32"), ()),
    ("torch-pickled-model", "pytorch", {"model": {"framework": "pytorch", "path": "pickled.pt"}},
     "spec.model.path", ("pickled.pt", "refusing to unpickle", "Allowed"), ()),
    ("torch-pickled-pt2", "pytorch", {"model": {"framework": "pytorch", "path": "pickled.pt2"}},
     "spec.model.path", ("torch.save(model)", "Allowed"), ()),
    ("torch-weights-as-model", "pytorch", {"model": {"framework": "pytorch", "path": "weights.pt"}},
     "spec.model.path", ("weights file, not a model",), ()),
    ("torch-wrong-entrypoint-function", "pytorch",
     {"model": {"framework": "pytorch", "entrypoint": "tiny_torch:buidl"}},
     "spec.model.entrypoint", ("it has", "build", "Tiny"), ()),
    ("torch-entrypoint-module-missing", "pytorch", {"model": {"framework": "pytorch", "entrypoint": "nowhere:build"}},
     "spec.model.entrypoint", ("nowhere",), ()),
    ("torch-entrypoint-raises", "pytorch", {"model": {"framework": "pytorch", "entrypoint": "tiny_torch:broken"}},
     "spec.model.entrypoint", ("RuntimeError", "no weights here"), ()),
    ("torch-weights-do-not-match", "pytorch",
     {"model": {"framework": "pytorch", "entrypoint": "tiny_torch:other_shape", "weights": "weights.pt"}},
     "spec.model.weights", ("do not match",), ()),
    ("torch-string-labels-with-f1", "pytorch",
     {"model": TORCH, "data.evaluation.path": "strings.npz", "data.evaluation.metric": "f1"},
     "spec.data.evaluation.metric", ("f1",), ()),
    ("torch-metric-raises", "pytorch", {"model": TORCH, "data.evaluation.metric": "user_code:Exploding"},
     "spec.data.evaluation.metric", ("KeyError",), ()),
]
SUBPROCESS = {"ort-eval-without-labels", "ort-adaptor-not-importable", "torch-float64-inputs", "torch-pickled-model"}


def check_one_line(output: str, code: int, field: str, words: tuple[str, ...], absent: tuple[str, ...]) -> str:
    assert code == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert ANSI not in output.split("qtune: error:")[-1], output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("qtune: error:")]
    assert len(errors) == 1, output[-3000:]
    message = errors[0]
    assert output.rstrip().endswith(message), "the error is the last line"
    assert f"{field}:" in message or f"{field} " in message, message
    for word in words:
        assert word in message, (word, message)
    for word in absent:
        assert word not in message, (word, message)
    return message


@pytest.mark.parametrize("row", ROWS, ids=[row[0] for row in ROWS])
def test_bad_input_is_one_line_naming_the_field(row, folder: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    name, _framework, edits, field, words, absent = row
    job_file = job(folder, name, edits)
    monkeypatch.chdir(folder.parent)  # the job's folder is found from the job file, not the cwd
    if name in SUBPROCESS:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run([sys.executable, "-m", "qtune.cli.main", "tune", str(job_file)], capture_output=True,
                              text=True, timeout=300, env=env, cwd=folder.parent)
        check_one_line(done.stdout + done.stderr, done.returncode, field, words, absent)
        return
    code = qtune_main(["tune", str(job_file)])
    captured = capsys.readouterr()
    check_one_line(captured.out + captured.err, code, field, words, absent)
