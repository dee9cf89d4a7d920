"""`python -m qtune.runner cleanup`: the models of non-winning trials leave a real workspace folder, their
results and logs stay, links are never followed; `qtune tune` applies the same policy (spec.workspace.trialModels)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from simulated import job_spec, run_simulated, simulated_space

from qtune.local.driver import _clean_trial_models
from qtune.runner.cleanup import parse_keep, remove_trial_models
from qtune.spec.models import QuantizationJob
from qtune.tuning.front import session_front


def _workspace(tmp_path: Path) -> Path:
    workspace = tmp_path / "ws"
    for index in range(4):
        trial = workspace / "trials" / str(index)
        trial.mkdir(parents=True)
        (trial / "result.json").write_text("{}")
        (trial / "trial.log").write_text("log")
    (workspace / "trials" / "0" / "model").mkdir()
    (workspace / "trials" / "0" / "model" / "model.onnx").write_bytes(b"x" * 100)
    for name in ("model.onnx", "model.onnx.data", "qtune_model.json"):  # a model file with its sidecars
        (workspace / "trials" / "1" / name).write_bytes(b"y" * 10)
    (workspace / "trials" / "2" / "model").mkdir()
    (workspace / "trials" / "2" / "model" / "weights.bin").write_bytes(b"z")
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    (workspace / "trials" / "3" / "model").symlink_to(outside, target_is_directory=True)
    (workspace / "space.json").write_text("{}")
    return workspace


def test_the_cleanup_command_keeps_the_winner_and_everything_but_models(tmp_path: Path) -> None:
    workspace = _workspace(tmp_path)
    done = subprocess.run([sys.executable, "-m", "qtune.runner", "cleanup", "--workspace", str(workspace),
                           "--keep", "2"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    trials = workspace / "trials"
    assert sorted(p.name for p in (trials / "0").iterdir()) == ["result.json", "trial.log"]
    assert sorted(p.name for p in (trials / "1").iterdir()) == ["result.json", "trial.log"]
    assert (trials / "2" / "model" / "weights.bin").exists()  # the winner's model stays
    assert not (trials / "3" / "model").exists() and (tmp_path / "precious" / "keep.txt").exists()
    assert (workspace / "space.json").exists()
    assert "deleted the models of 3 trial(s)" in done.stderr


def test_no_winner_removes_every_model_and_a_second_run_changes_nothing(tmp_path: Path) -> None:
    workspace = _workspace(tmp_path)
    removed, freed = remove_trial_models(workspace, [])
    assert removed == [0, 1, 2, 3] and freed >= 131
    assert remove_trial_models(workspace, []) == ([], 0)
    assert remove_trial_models(tmp_path / "nowhere", [1]) == ([], 0)


def test_bad_keep_lists_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--keep"):
        parse_keep("3,x")
    done = subprocess.run([sys.executable, "-m", "qtune.runner", "cleanup", "--workspace", str(tmp_path),
                           "--keep", "-1"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "--keep" in done.stderr


@pytest.mark.parametrize("policy,keep_all", [(None, False), ("keep-best", False), ("keep-all", True)])
def test_qtune_tune_applies_the_jobs_policy(tmp_path: Path, policy: str | None, keep_all: bool) -> None:
    workspace = _workspace(tmp_path)
    spec = job_spec(maxTrials=4)
    session, _, _ = run_simulated(spec, simulated_space(), lambda config: 0.95 if config.fp32_ops() else 0.5)
    best = session.best()
    assert best is not None and best.index in range(4)
    front = {entry.trial for entry in session_front(session)}
    assert front <= {t.index for t in session.history.trials if t.speed}
    kept = {0, 1, 2, 3} if keep_all else ({best.index} | front) & {0, 1, 2, 3}  # the winner's and the front's
    document = {"apiVersion": "qtune.io/v1alpha1", "kind": "QuantizationJob", "metadata": {"name": "j"},
                "spec": spec.model_dump(by_alias=True, exclude_none=True)}
    if policy:
        document["spec"]["workspace"] = {"trialModels": policy}
    _clean_trial_models(QuantizationJob.model_validate(document), session, workspace)
    with_model = {i for i in range(4) if any(p.name != "result.json" and p.name != "trial.log"
                                             for p in (workspace / "trials" / str(i)).iterdir())}
    assert with_model == kept
