"""The command `qtune tune` starts each unit with: a module in the user's current folder never shadows an
installed one (docs: "installed packages are never shadowed")."""

from __future__ import annotations

import subprocess
from pathlib import Path

from qtune.local.executor import LocalExecutor
from qtune.tuning.session import WorkUnit


def test_a_yaml_py_in_the_current_folder_is_not_imported(tmp_path: Path) -> None:
    shell_folder = tmp_path / "shell"
    shell_folder.mkdir()
    (shell_folder / "yaml.py").write_text('raise SystemExit("the yaml.py of the current folder ran")\n')
    executor = LocalExecutor(tmp_path / "job.yaml", tmp_path, tmp_path / "ws", parallel=1, trial_timeout=60)
    command = executor.command(WorkUnit.baseline(), tmp_path, threads=1)
    runner_args = command.index("qtune.runner") + 1
    # the unit's own interpreter flags and module, asked only for its usage (imports the runner, spec and yaml)
    done = subprocess.run([*command[:runner_args], "--help"], cwd=shell_folder, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "current folder ran" not in done.stdout + done.stderr
