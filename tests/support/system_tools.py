"""The commands the suite needs from the machine, read from requirements/system.txt: the same list
scripts/setup.sh installs, so a presence check cannot ask for a program that setup never installs
(tests/unit/test_system_tools.py checks every ``shutil.which`` of the suite against it)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

SYSTEM_LIST = Path(__file__).resolve().parents[2] / "requirements" / "system.txt"


@dataclass(frozen=True)
class SystemPackage:
    group: str      # local | cluster
    source: str     # apt:NAME | pip:REQUIREMENT
    commands: tuple[str, ...]


@cache
def system_packages(path: Path = SYSTEM_LIST) -> tuple[SystemPackage, ...]:
    packages = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) < 3 or not fields[1].startswith(("apt:", "pip:")):
            raise ValueError(f"{path}:{number}: expected 'group apt:NAME|pip:REQ command... | -', got {line!r}")
        commands = tuple(c for c in fields[2:] if c != "-")
        packages.append(SystemPackage(fields[0], fields[1], commands))
    return tuple(packages)


def provider(command: str) -> SystemPackage:
    """The package of requirements/system.txt that installs `command` (KeyError naming the list if none)."""
    for package in system_packages():
        if command in package.commands:
            return package
    raise KeyError(f"{command!r} is not in {SYSTEM_LIST.name}: add the package that installs it there, "
                   "so scripts/setup.sh installs what the tests look for")


def missing(*commands: str) -> list[str]:
    """Which of `commands` are not on PATH, each with the package that installs it. Every command must
    be one setup installs (`provider`), so a test cannot depend on a program nothing installs."""
    out = []
    for command in commands:
        package = provider(command)
        if shutil.which(command) is None:
            out.append(f"{command} ({package.source}, bash scripts/setup.sh)")
    return out
