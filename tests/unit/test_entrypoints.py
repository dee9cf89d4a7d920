"""Entrypoints import from the job's folder: two jobs with a module of the same name in one process
(as in a test run, or a notebook tuning two models) each get their own module."""

from __future__ import annotations

import sys
from pathlib import Path

from qtune.spec.entrypoints import load_entrypoint


def _job(folder: Path, answer: int) -> Path:
    folder.mkdir()
    (folder / "shared_name_metric.py").write_text(f"def score(model):\n    return {answer}\n")
    return folder


def test_each_job_gets_its_own_module_of_a_shared_name(tmp_path: Path) -> None:
    first, second = _job(tmp_path / "a", 1), _job(tmp_path / "b", 2)
    try:
        field = "spec.data.evaluation.evalFunc"
        assert load_entrypoint("shared_name_metric:score", field, first)(None) == 1
        assert load_entrypoint("shared_name_metric:score", field, second)(None) == 2
        assert load_entrypoint("shared_name_metric:score", field, first)(None) == 1
    finally:
        sys.modules.pop("shared_name_metric", None)


def test_a_job_file_never_shadows_an_installed_module(tmp_path: Path) -> None:
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "json.py").write_text("def dumps(value):\n    return 'shadowed'\n")
    assert load_entrypoint("json:dumps", "spec.data.evaluation.metric", folder)([1]) == "[1]"
