"""Tuning: the space, strategies, accuracy criterion, objectives, history and stop rules.

Knows the adaptor interfaces only through plain data (capabilities, tune configs)."""

from qtune.tuning.config import OpConfig, TensorConfig, TuneConfig
from qtune.tuning.criterion import Criterion
from qtune.tuning.history import Baseline, History, TrialRecord
from qtune.tuning.objective import select_best
from qtune.tuning.space import OpSpace, TuningSpace, build_space
from qtune.tuning.stop import StopRules
from qtune.tuning.strategies import Strategy, create_strategy

__all__ = [
    "Baseline",
    "Criterion",
    "History",
    "OpConfig",
    "OpSpace",
    "Strategy",
    "StopRules",
    "TensorConfig",
    "TrialRecord",
    "TuneConfig",
    "TuningSpace",
    "build_space",
    "create_strategy",
    "select_best",
]
