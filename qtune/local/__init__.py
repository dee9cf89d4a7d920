"""The embedded executor: tunes a job on this machine with trials as local processes."""

from qtune.local.driver import TuneOutcome, tune

__all__ = ["TuneOutcome", "tune"]
