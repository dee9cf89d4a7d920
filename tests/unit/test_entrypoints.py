"""Entrypoints import from the job's folder: two jobs with a module of the same name in one process
(as in a test run, or a notebook tuning two models) each get their own module."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

from qtune.spec.base import ENTRYPOINT_PATTERN
from qtune.spec.entrypoints import EntrypointError, load_entrypoint

ROOT = Path(__file__).resolve().parents[2]


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


def test_a_module_above_the_job_folder_is_not_searched(tmp_path: Path) -> None:
    """Only the job's folder: a module one folder up (what a job once found in its parents) is not imported."""
    (tmp_path / "above_the_job_folder.py").write_text("def score(model):\n    return 1\n")
    folder = tmp_path / "job"
    folder.mkdir()
    with pytest.raises(EntrypointError, match=f"no module named 'above_the_job_folder' is installed nor in the "
                                              f"job's folder {re.escape(str(folder.resolve()))};"):
        load_entrypoint("above_the_job_folder:score", "spec.data.evaluation.evalFunc", folder)
    assert str(tmp_path.resolve()) not in sys.path


def test_a_package_in_the_job_folder_imports_by_its_qualified_name(tmp_path: Path) -> None:
    package = tmp_path / "job" / "job_folder_pkg" / "sub"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "metrics.py").write_text("def score(model):\n    return 7\n")
    try:
        assert load_entrypoint("job_folder_pkg.sub.metrics:score", "spec.data.evaluation.evalFunc",
                               tmp_path / "job")(None) == 7
    finally:
        for name in [m for m in sys.modules if m.startswith("job_folder_pkg")]:
            del sys.modules[name]


ENTRYPOINT_FIELDS = ("entrypoint", "metric", "evalFunc", "framework", "strategy")


def _entrypoints(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k in ENTRYPOINT_FIELDS and isinstance(v, str)
                 and ENTRYPOINT_PATTERN.match(v)]
        return found + [e for v in node.values() for e in _entrypoints(v)]
    if isinstance(node, list):
        return [e for v in node for e in _entrypoints(v)]
    return []


@pytest.mark.parametrize("job_file", sorted(p for p in (ROOT / "examples").rglob("*.yaml")
                                            if "QuantizationJob" in p.read_text()), ids=lambda p: p.parent.name)
def test_every_example_job_names_code_of_its_own_folder(job_file: Path) -> None:
    """Each `module:Name` an example names is a module of the job's folder (or installed): none relies on a
    folder above it."""
    for document in yaml.safe_load_all(job_file.read_text()):
        for value in _entrypoints(document):
            module = value.partition(":")[0]
            path = job_file.parent.joinpath(*module.split("."))
            if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
                continue
            found = importlib.util.find_spec(module.split(".")[0])  # installed, not a folder of this repository
            places = [found.origin] if found is not None and found.origin else []
            places += list(found.submodule_search_locations or []) if found is not None else []
            assert places and not any(Path(p).resolve().is_relative_to(ROOT) for p in places), \
                f"{job_file}: {value} is neither in the job's folder nor installed"
