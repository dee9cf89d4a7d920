"""Pods run the runner with Python's safe-path mode (issue 12): nothing is imported from the working
directory by accident, and a job's own module beside its job file still loads, through the job's
folder (`--base-dir`), as the digit_strings example's metric does."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from qtune.operator.config import OperatorConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "digit_strings"

DECOY = '''
import os
open(os.path.join(os.getcwd(), "decoy-imported"), "w").close()
raise ImportError("the working directory's sequence_metrics.py was imported")
'''


def _built_example() -> Path:
    """examples/digit_strings with its model and data (built on a fresh checkout, as its own test does)."""
    if not all((EXAMPLE / name).is_file() for name in ("model.onnx", "calib.npz", "eval.npz")):
        subprocess.run([sys.executable, str(EXAMPLE / "build.py")], check=True, timeout=900, capture_output=True)
    return EXAMPLE


def test_the_pod_command_imports_the_job_module_from_the_job_folder_only(tmp_path: Path) -> None:
    _built_example()
    job = tmp_path / "pvc"
    shutil.copytree(EXAMPLE, job, ignore=shutil.ignore_patterns("build.py", "__pycache__"))
    workdir = tmp_path / "pvc-job-folder"  # the pod's working directory (its own folder)
    workdir.mkdir()
    (workdir / "sequence_metrics.py").write_text(DECOY)
    command = list(OperatorConfig().runner_command)
    assert command[:3] == ["python", "-P", "-m"]
    argv = [sys.executable, *command[1:], "baseline", "--job", str(job / "job.yaml"), "--base-dir", str(job),
            "--workspace", str(workdir), "--threads", "1", "--result", str(tmp_path / "result.json")]
    proc = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "succeeded" and result["metric"] == "sequence_metrics:ExactMatch"
    assert result["accuracy"] > 0.9
    assert not (workdir / "decoy-imported").exists()
