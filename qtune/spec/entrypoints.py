"""Importing the user code a job names as `module:Name` (model, data, metric, evalFunc, adaptor, strategy).

Every entrypoint is imported the same way, locally and in a trial pod: the job's folder (the
folder of the job file for `qtune tune`, the runner's `--base-dir`, i.e. the workspace mount, in
a pod), and only it, is appended to `sys.path`, so a module beside the job file imports without
PYTHONPATH, and a package in that folder by its qualified name (`mypkg.models:build` for
`mypkg/models.py`). No parent folder is searched: what a job runs is in its folder (or installed,
or in the trial image), never picked up from whatever folder happens to sit above it. The folder
is *appended*: a file of the job never shadows an installed module.

Every failure is one line naming the job field and what is allowed (`EntrypointError`).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from pathlib import Path
from typing import Any, Literal

from qtune.spec.errors import SpecError

logger = logging.getLogger(__name__)

Kind = Literal["callable", "class", "function"]


class EntrypointError(SpecError):
    """A `module:Name` of the job cannot be imported or is not what the field expects."""


def job_search_path(base_dir: str | Path | None) -> list[str]:
    """The folders an entrypoint is searched in besides the installed packages: the job's folder only."""
    if base_dir is None:
        return []
    return [str(Path(base_dir).resolve())]


_JOB_DIRS: set[str] = set()
"""Folders add_job_dir put on sys.path (several jobs may run in one process, e.g. tests)."""


def add_job_dir(base_dir: str | Path | None) -> None:
    """Append the job's folder to `sys.path` once. Idempotent."""
    for folder in job_search_path(base_dir):
        if folder not in sys.path:
            sys.path.append(folder)
            _JOB_DIRS.add(folder)
    importlib.invalidate_caches()


def _holds(folder: str, top: str) -> bool:
    return (Path(folder) / f"{top}.py").is_file() or (Path(folder) / top / "__init__.py").is_file()


def _prefer_own_module(module_name: str, base_dir: str | Path | None) -> None:
    """When this job's folder holds the module, another job's module of the same name (an earlier job
    folder on sys.path, or already imported from one) must not answer for it. Installed modules still
    win: only job folders are reordered."""
    top = module_name.split(".")[0]
    own = next((f for f in job_search_path(base_dir) if _holds(f, top)), None)
    if own is None:
        return
    loaded = sys.modules.get(top)
    file = getattr(loaded, "__file__", None)
    if loaded is not None and file and any(Path(file).resolve().is_relative_to(d) for d in _JOB_DIRS - {own}) \
            and not Path(file).resolve().is_relative_to(own):
        for name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
            del sys.modules[name]
    rivals = [i for i, folder in enumerate(sys.path) if folder in _JOB_DIRS and folder != own and _holds(folder, top)]
    if rivals and own in sys.path and min(rivals) < sys.path.index(own):
        sys.path.remove(own)
        sys.path.insert(min(rivals), own)
        importlib.invalidate_caches()


def _public_names(module: Any, kind: Kind) -> list[str]:
    names = []
    for name, value in vars(module).items():
        if name.startswith("_") or inspect.ismodule(value):
            continue
        if getattr(value, "__module__", module.__name__) != module.__name__:
            continue  # imported from elsewhere
        if kind == "class" and not inspect.isclass(value):
            continue
        if kind != "class" and not callable(value):
            continue
        names.append(name)
    return sorted(names)


def _where(module: Any) -> str:
    file = getattr(module, "__file__", None)
    return f"{module.__name__} ({file})" if file else module.__name__


def load_entrypoint(value: str, field: str, base_dir: str | Path | None = None, *, kind: Kind = "callable",
                    allowed: str = "module:Name") -> Any:
    """Import `module:Name` for the job field `field` (dotted camelCase, e.g. spec.data.evaluation.metric).

    `kind`: "function" or "callable" (anything callable, classes included) or "class".
    Raises EntrypointError with one line naming the field, the problem and what the module has."""
    module_name, sep, attribute = str(value).partition(":")
    if not sep or not module_name or not attribute:
        raise EntrypointError(field, f"got {value!r}; allowed: {allowed}")
    add_job_dir(base_dir)
    _prefer_own_module(module_name, base_dir)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            where = job_search_path(base_dir)
            place = f" nor in the job's folder {where[0]}" if where else ""
            raise EntrypointError(
                field, f"cannot import {value}: no module named {missing!r} is installed{place}; "
                       f"allowed: {allowed}, importable from the job's folder or the Python path") from None
        raise EntrypointError(field, f"cannot import {value}: module {module_name} needs {missing!r}, which is "
                                     "not installed") from None
    except SyntaxError as exc:
        raise EntrypointError(field, f"cannot import {value}: syntax error in {exc.filename} line {exc.lineno}: "
                                     f"{exc.msg}") from None
    except Exception as exc:  # noqa: BLE001 - user code may raise anything on import
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise EntrypointError(field, f"cannot import {value}: importing {module_name} raised "
                                     f"{type(exc).__name__}: {first}") from None
    target = getattr(module, attribute, None)
    if target is None:
        has = _public_names(module, kind)
        listing = ", ".join(has[:20]) + (" ..." if len(has) > 20 else "") if has else "nothing public"
        what = "class" if kind == "class" else "function or class" if kind == "callable" else "function"
        raise EntrypointError(field, f"module {_where(module)} has no {what} {attribute!r}; it has: {listing}")
    if kind == "class" and not inspect.isclass(target):
        raise EntrypointError(field, f"{value} is a {type(target).__name__}, not a class; allowed: {allowed}")
    if kind != "class" and not callable(target):
        raise EntrypointError(field, f"{value} is a {type(target).__name__}, not callable; allowed: {allowed}")
    logger.debug("%s: imported %s from %s", field, value, getattr(module, "__file__", module_name))
    return target
