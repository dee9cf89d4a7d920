"""`qtune tune` turns an exception nobody expected into ONE line naming what failed and where; the
traceback only with `-v` (before or after the command). Bad input has its own table
(test_bad_inputs.py); these are the failures of code: qtune's own, or the user's (a strategy)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from qtune.cli import main as cli

JOB = {"apiVersion": "qtune.io/v1alpha1", "kind": "QuantizationJob", "metadata": {"name": "crash"},
       "spec": {"model": {"framework": "onnxruntime", "path": "model.onnx"},
                "data": {"calibration": {"path": "calib.npz"}, "evaluation": {"path": "eval.npz"}},
                "tuning": {"maxTrials": 2}, "benchmark": {"batchSizes": [1], "warmupRuns": 0, "runs": 2},
                "output": {"path": "out"}}}


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("qtune: error:")]


def _job_file(folder: Path, **tuning: object) -> Path:
    document = yaml.safe_load(yaml.safe_dump(JOB))
    document["spec"]["tuning"].update(tuning)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def _explode(*args: object, **kwargs: object) -> None:
    table: dict[str, int] = {}
    table["best"] += 1  # KeyError: 'best', as a bug in qtune would raise it


@pytest.mark.parametrize("verbose", [[], ["-v", "tune"], ["tune", "-v"]], ids=["quiet", "-v before", "-v after"])
def test_an_unexpected_error_is_one_line_and_the_traceback_needs_v(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   verbose: list[str]) -> None:
    import qtune.local

    monkeypatch.setattr(qtune.local, "tune", _explode)
    job_file = _job_file(tmp_path)
    argv = [*verbose, str(job_file)] if verbose else ["tune", str(job_file)]
    code = cli.main(argv)
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert code == cli.EXIT_ERROR == 1
    errors = _error_lines(output)
    assert len(errors) == 1 and output.rstrip().endswith(errors[0]), output
    message = errors[0]
    assert "tune failed: KeyError in _explode (test_cli_errors.py:" in message and "'best'" in message, message
    if verbose:
        assert "Traceback (most recent call last)" in output and "for the traceback" not in message
    else:
        assert "Traceback" not in output and "run `qtune -v tune ...` for the traceback" in message


def test_the_line_strips_terminal_codes_and_joins_lines() -> None:
    try:
        raise RuntimeError("\x1b[31mshape mismatch\x1b[0m\n  at layer 3\n")
    except RuntimeError as exc:
        message = cli.unexpected_error("tune", exc)
    assert "\x1b" not in message and "\n" not in message
    assert "RuntimeError in test_the_line_strips_terminal_codes_and_joins_lines" in message
    assert message.startswith("tune failed: RuntimeError in ") and ": shape mismatch at layer 3;" in message


BROKEN_STRATEGY = textwrap.dedent('''
    from qtune.tuning.strategies.base import Strategy

    class Broken(Strategy):
        def propose(self, space, history, k):
            return [1 / 0]
''')


def test_a_user_strategy_that_raises_is_one_line_from_the_real_command(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 3)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"], name="mm")], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "model.onnx")
    x = rng.normal(size=(32, 4)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    np.savez(tmp_path / "eval.npz", x=x, labels=(x @ weight).argmax(1))
    (tmp_path / "broken_strategy.py").write_text(BROKEN_STRATEGY)
    job_file = _job_file(tmp_path, strategy="broken_strategy:Broken")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    elsewhere = tmp_path / "elsewhere"  # not the job's folder: `python -m` puts the cwd on sys.path
    elsewhere.mkdir()
    for verbose in (False, True):
        command = [sys.executable, "-m", "qtune.cli.main", *(["-v"] if verbose else []), "tune", str(job_file),
                   "--fresh"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=elsewhere)
        output = done.stdout + done.stderr
        assert done.returncode == 1, output[-3000:]
        errors = _error_lines(output)
        assert len(errors) == 1 and output.rstrip().endswith(errors[0]), output[-3000:]
        assert "ZeroDivisionError in propose (broken_strategy.py:6): division by zero" in errors[0], errors[0]
        assert ("Traceback" in output) == verbose, output[-3000:]
