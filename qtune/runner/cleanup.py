"""`python -m qtune.runner cleanup --workspace DIR --keep 3[,5]`: delete the models of all trials but the
kept ones from a job's workspace (cleanup policy keep-best: the models of the winner and of the other configs
on the accuracy-speed front stay).

`python -m qtune.runner cleanup --jobs-root DIR --remove-job-folder NAME`: delete a deleted job's whole folder
DIR/NAME (the operator's folder cleanup pod, DIR being the PVC's `.qtune` folder). NAME must be a job folder's
name (`<job>-<uid8>`, qtune.protocol.is_job_folder): never a path, `..` or a parent.

A trial saves its model as `trials/<n>/model` (a folder, or files named model.* beside the adaptor's
sidecars, see qtune.local.driver.MODEL_FOLDER); its other files (result, logs) stay: they are small and
say what the trial did. Symbolic links are removed, never followed. The same code runs locally at the
end of `qtune tune` and on the cluster in a short pod with the job's workspace mount.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

from qtune import protocol

logger = logging.getLogger("qtune.runner.cleanup")

KEEP_BEST, KEEP_ALL = "keep-best", "keep-all"
MODEL_NAME = "model"
MODEL_SIDECARS = ("qtune_model.json",)


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_symlink() and p.is_file())


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def model_paths(trial_dir: Path) -> list[Path]:
    """What of a trial folder is its model: `model` (folder or file), files `model.*`, the sidecars."""
    return sorted(p for p in trial_dir.iterdir()
                  if p.name == MODEL_NAME or p.name.startswith(MODEL_NAME + ".") or p.name in MODEL_SIDECARS)


def remove_trial_models(workspace: Path, keep: Iterable[int]) -> tuple[list[int], int]:
    """Delete the model of every trial under `workspace/trials` whose index is not in `keep`; returns (the
    trials whose model was deleted, bytes freed)."""
    kept = {int(i) for i in keep}
    trials = Path(workspace) / "trials"
    if not trials.is_dir() or trials.is_symlink():
        return [], 0
    removed: list[int] = []
    freed = 0
    for folder in sorted(trials.iterdir(), key=lambda p: (len(p.name), p.name)):
        if not folder.name.isdigit() or folder.is_symlink() or not folder.is_dir() or int(folder.name) in kept:
            continue
        paths = model_paths(folder)
        for path in paths:
            freed += _size(path)
            _remove(path)
        if paths:
            removed.append(int(folder.name))
    logger.info("deleted the models of %d trial(s) (%d bytes); kept: %s", len(removed), freed,
                ", ".join(str(i) for i in sorted(kept)) or "none")
    return removed, freed


def remove_job_folder(jobs_root: Path, folder: str) -> int:
    """Delete `jobs_root/folder` and everything in it (symbolic links are removed, never followed); returns
    the bytes freed, 0 when it is absent. Raises ValueError for a `folder` that is not a job folder's name."""
    if not protocol.is_job_folder(folder):
        raise ValueError(f"--remove-job-folder: {folder!r} is not a job folder's name (<job>-<uid8>)")
    path = Path(jobs_root) / folder
    if not path.is_symlink() and not path.exists():
        logger.info("%s: no such folder (nothing to delete)", path)
        return 0
    freed = _size(path)
    _remove(path)
    logger.info("deleted the folder %s of a deleted job (%d bytes)", path, freed)
    return freed


def parse_keep(text: str) -> list[int]:
    """`3,5` -> [3, 5]; empty -> [] (no trial's model is kept)."""
    parts = [part.strip() for part in (text or "").split(",") if part.strip()]
    if not all(part.isdigit() for part in parts):
        raise ValueError(f"--keep: {text!r} is not a comma-separated list of trial numbers (e.g. 3 or 3,5)")
    return [int(part) for part in parts]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m qtune.runner cleanup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", help="the job's workspace folder (holds trials/<n>)")
    parser.add_argument("--keep", default="", help="trial numbers whose models stay, e.g. 3 or 3,5; empty: none")
    parser.add_argument("--jobs-root", help="the folder holding one folder per job (with --remove-job-folder)")
    parser.add_argument("--remove-job-folder", help="a deleted job's folder in --jobs-root: deleted whole")
    parser.add_argument("--log-level", default="INFO")
    args, _ = parser.parse_known_args(argv)  # the operator's common unit arguments are accepted and ignored
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.remove_job_folder is not None:
        if not args.jobs_root or not Path(args.jobs_root).is_dir():
            parser.error(f"--jobs-root {args.jobs_root} is not a folder")
        try:
            remove_job_folder(Path(args.jobs_root), args.remove_job_folder)
        except ValueError as exc:
            parser.error(str(exc))
        return 0
    if not args.workspace:
        parser.error("--workspace (or --jobs-root with --remove-job-folder) is required")
    try:
        keep = parse_keep(args.keep)
    except ValueError as exc:
        parser.error(str(exc))
    workspace = Path(args.workspace)
    if not workspace.is_dir():
        logger.error("--workspace %s is not a folder", workspace)
        return 1
    remove_trial_models(workspace, keep)
    return 0
