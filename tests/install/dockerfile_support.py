"""Read a Dockerfile and its .dockerignore well enough to check them and replay their pip steps.

No container engine runs on the test machines, so tests/install/test_dockerfile.py parses the
Dockerfile with these helpers, lints it, and runs the RUN steps that install Python packages in a
fresh virtual environment, with the image's paths mapped to temporary folders.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("qtune.tests.dockerfile")

DEFAULT_SHELL = ("/bin/sh", "-c")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    """Upper-case instruction (RUN, COPY, ...)."""
    flags: tuple[str, ...]
    """Leading ``--name=value`` flags (``--mount=...``, ``--from=...``)."""
    args: str
    """The rest of the instruction, continuation lines joined."""
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form of the arguments, or None for the shell form."""
        if self.args.startswith("["):
            value = json.loads(self.args)
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
        return None

    def mounts(self) -> list[dict[str, str]]:
        """``RUN --mount=type=bind,from=x,source=a,target=b`` as dicts."""
        out = []
        for flag in self.flags:
            if flag.startswith("--mount="):
                out.append(dict(part.split("=", 1) if "=" in part else (part, "true")
                                for part in flag.removeprefix("--mount=").split(",")))
        return out


@dataclass
class Stage:
    base: str
    """The FROM image as written (ARG references not expanded)."""
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def args(self) -> dict[str, str]:
        """ARG defaults declared in this stage."""
        return dict(_key_values(i.args) for i in self.all("ARG"))

    def env(self) -> dict[str, str]:
        """ENV values of this stage, in order (``ENV A=1 B=2`` or the legacy ``ENV A 1``)."""
        out: dict[str, str] = {}
        for i in self.all("ENV"):
            words = shlex.split(i.args)
            if words and "=" not in words[0]:
                out[words[0]] = " ".join(words[1:])
                continue
            out.update(_key_values(w) for w in words)
        return out

    def shell(self) -> tuple[str, ...]:
        instr = self.last("SHELL")
        form = instr.exec_form() if instr else None
        return tuple(form) if form else DEFAULT_SHELL


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    """ARG defaults declared before the first FROM."""
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def base_image(self, stage: Stage) -> str:
        """The FROM image with global ARG defaults substituted."""
        return expand(stage.base, self.global_args)


def _key_values(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.strip(), value.strip().strip('"')


def expand(text: str, values: dict[str, str]) -> str:
    """``$NAME``/``${NAME}`` substituted from ``values`` (unknown names become empty, like Docker)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), ""), text)


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Instructions as (first line number, text): continuations joined, comments dropped."""
    out: list[tuple[int, str]] = []
    current: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue  # blank line or comment (parser directives included)
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not current:
            start = number
        if stripped.endswith("\\"):
            current.append(stripped[:-1].rstrip())
            continue
        current.append(stripped)
        out.append((start, " ".join(p for p in current if p)))
        current = []
    if current:
        out.append((start, " ".join(current)))
    return out


def parse(text: str) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        flags: list[str] = []
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            flags.append(flag)
            rest = rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
            continue
        if not stages:
            if keyword != "ARG":
                raise ValueError(f"line {number}: {keyword} before the first FROM")
            global_args.update([_key_values(rest)])
            continue
        stages[-1].instructions.append(Instruction(keyword, tuple(flags), rest, number))
    if not stages:
        raise ValueError("no FROM instruction")
    return Dockerfile(global_args, stages)


# --------------------------------------------------------------------------- .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus ``**``) as a regular expression."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def read_dockerignore(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per pattern, in file order."""
    rules = []
    if not path.exists():
        return rules
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negated, _pattern_regex(pattern)))
    return rules


def is_ignored(relpath: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins."""
    parts = relpath.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for negated, regex in rules:
        if any(regex.match(c) for c in candidates):
            ignored = not negated
    return ignored


def build_context(source: Path, dest: Path) -> list[str]:
    """Copy what Docker would send as the build context (``.dockerignore`` applied) to ``dest``."""
    rules = read_dockerignore(source / ".dockerignore")
    copied = []
    for root, dirs, files in os.walk(source):
        rel_root = os.path.relpath(root, source)
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in files:
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            if is_ignored(rel, rules):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(root) / name, target)
            copied.append(rel)
    log.info("build context: %d files", len(copied))
    return sorted(copied)


def map_paths(command: str, mapping: dict[str, Path]) -> str:
    """Replace image paths (``/wheels``, ``/src``) in a shell command by host folders."""
    for image_path in sorted(mapping, key=len, reverse=True):
        command = re.sub(rf"(?<![\w./-]){re.escape(image_path)}(?=/|\b|$)", str(mapping[image_path]), command)
    return command
