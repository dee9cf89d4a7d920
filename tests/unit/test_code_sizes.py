"""Small modules and functions (issue 19): no module of qtune/ over 450 lines, no function over 60."""

from __future__ import annotations

import ast
from pathlib import Path

QTUNE = Path(__file__).resolve().parents[2] / "qtune"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(QTUNE.rglob("*.py"))


def test_the_package_is_found() -> None:
    assert (QTUNE / "__init__.py").is_file() and len(_modules()) > 10


def test_no_module_is_over_450_lines() -> None:
    long = {str(path.relative_to(QTUNE.parent)): count for path in _modules()
            if (count := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them along their seams): {long}"


def test_no_function_is_over_60_lines() -> None:
    long: dict[str, int] = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                count = (node.end_lineno or node.lineno) - node.lineno + 1
                if count > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(QTUNE.parent)}:{node.lineno} {node.name}"] = count
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into pieces with one job): {long}"
