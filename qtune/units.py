"""The units of work and their ids: what a unit is called on the wire, in pod names and labels, in the
runner's arguments and in the workspace (job folders); their time limits. No message, no framework:
qtune.protocol re-exports all of it."""

from __future__ import annotations

import re
from enum import StrEnum


class UnitKind(StrEnum):
    """The kinds of unit of work. A str: the values are what the wire, the pods' labels and args, the runner's
    commands and stored histories carry. The baseline, the confirmation and the cleanup are one per job, so
    each one's unit id is its kind's value; a trial's id is `trial-<n>` (`trial_unit`)."""

    BASELINE = "baseline"
    TRIAL = "trial"
    CONFIRM = "confirm"
    CLEANUP = "cleanup"
    """Operator only: the short pod that deletes the models of non-winning trials when a job ends (no result)."""


# --- unit ids and limits ------------------------------------------------------------------------
LONG_UNIT_FACTOR = 2
"""The baseline and the confirmation may take this many trial timeouts ..."""
LONG_UNIT_FLOOR_SECONDS = 600
"""... and at least this long: the baseline also measures op sensitivity and profiles the graph."""


def unit_timeout_seconds(kind: UnitKind, trial_timeout: float) -> float:
    """The wall-clock limit of one unit, the same for a local process and a pod."""
    if kind == UnitKind.TRIAL:
        return float(trial_timeout)
    return float(max(LONG_UNIT_FACTOR * trial_timeout, LONG_UNIT_FLOOR_SECONDS))


TRIAL_PREFIX = f"{UnitKind.TRIAL.value}-"


def trial_unit(index: int) -> str:
    return f"{TRIAL_PREFIX}{int(index)}"


def unit_trial_index(unit: str) -> int | None:
    """3 for "trial-3"; None for "baseline", "confirm" or anything else."""
    if unit.startswith(TRIAL_PREFIX) and unit[len(TRIAL_PREFIX):].isdigit():
        return int(unit[len(TRIAL_PREFIX):])
    return None


JOBS_FOLDER = ".qtune"
"""The folder of the workspace PVC holding one folder per job object (`job_folder`), all the operator writes."""
_JOB_FOLDER = re.compile(r"[a-z0-9](?:[-a-z0-9.]{0,61}[a-z0-9])?-[0-9a-f]{8}")


def job_folder(name: str, uid: str) -> str:
    """`<name>-<uid8>`: the job object's own folder in JOBS_FOLDER, the only place its pods may write."""
    return f"{name}-{uid[:8]}"


def is_job_folder(folder: str) -> bool:
    """A name `job_folder` gives a real job (a DNS name of at most 63 characters, `-`, 8 hex digits): never a
    path, `.`, `..` or a parent. What a folder cleanup may delete, checked by the operator and the runner."""
    return bool(_JOB_FOLDER.fullmatch(folder)) and ".." not in folder


def unit_kind(unit: str) -> UnitKind | None:
    """The kind of the unit with this id: TRIAL for "trial-3", BASELINE for "baseline", ...; None for an id that
    is no unit's."""
    if unit_trial_index(unit) is not None:
        return UnitKind.TRIAL
    if unit in (UnitKind.BASELINE, UnitKind.CONFIRM, UnitKind.CLEANUP):
        return UnitKind(unit)
    return None
