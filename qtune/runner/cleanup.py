"""`python -m qtune.runner cleanup --workspace DIR --keep 3[,5]`: delete the models of all trials but the
kept ones from a job's workspace (cleanup policy keep-best: the models of the winner and of the other configs
on the accuracy-speed front stay).

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


def parse_keep(text: str) -> list[int]:
    """`3,5` -> [3, 5]; empty -> [] (no trial's model is kept)."""
    parts = [part.strip() for part in (text or "").split(",") if part.strip()]
    if not all(part.isdigit() for part in parts):
        raise ValueError(f"--keep: {text!r} is not a comma-separated list of trial numbers (e.g. 3 or 3,5)")
    return [int(part) for part in parts]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m qtune.runner cleanup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", required=True, help="the job's workspace folder (holds trials/<n>)")
    parser.add_argument("--keep", default="", help="trial numbers whose models stay, e.g. 3 or 3,5; empty: none")
    parser.add_argument("--log-level", default="INFO")
    args, _ = parser.parse_known_args(argv)  # the operator's common unit arguments are accepted and ignored
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
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
