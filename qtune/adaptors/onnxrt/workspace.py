"""Files shared by the trials of one job: inter-process locks and atomic writes.

Several trial processes (or pods on one volume) may ask for the same optimised model or the same
calibration statistics at once. The first takes an exclusive lock and computes; the others wait on
the lock and then read the published result. Results are published atomically (write to a temporary
name in the same folder, then rename), so a reader never sees half a file, even without locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on `path` (created if missing), released on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1, sort_keys=True, default=str)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def read_json(path: Path) -> Any | None:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@contextlib.contextmanager
def private_model_path(model_path: Path) -> Iterator[Path]:
    """The model file under a private name in its own folder (a hard link, or a copy).

    ORT's quantization tools write scratch files named after the model they are given, next to it
    (`<model>-inferred.onnx`, deleted again): two trials handing ORT the same shared file would
    delete each other's scratch files. External data stays shared (same folder, same relative
    location; onnx refuses external data reached through links, so those are never linked)."""
    private = model_path.parent / f".{model_path.stem}-{uuid.uuid4().hex[:12]}{model_path.suffix}"
    try:
        try:
            os.link(model_path, private)
        except OSError:
            shutil.copyfile(model_path, private)
        yield private
    finally:
        private.unlink(missing_ok=True)


def new_staging_dir(parent: Path, name: str) -> Path:
    """A fresh private folder next to where `name` will be published."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}."))


def publish_dir(staging: Path, final: Path) -> None:
    """Rename a completed staging folder to its final name; if another process won, drop ours."""
    try:
        os.rename(staging, final)
    except OSError:
        if final.exists():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            raise
