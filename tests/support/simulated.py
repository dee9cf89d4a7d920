"""A simulated executor for driving the REAL tuning session in tests (no test writes its own loop).

Accuracy and speed come from small deterministic models of a network: each quantized op costs
some accuracy (a few ops cost a lot) and each quantized op saves some time, while an fp32 op
left inside an int8 chain costs Q/DQ overhead. Results can be returned in any order, to show
that the order of arrival never changes what the session decides.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qtune.protocol import (
    BaselineResult,
    ConfirmResult,
    SpeedMeasurement,
    TrialResult,
    UnitKind,
)
from qtune.spec.models import JobSpec
from qtune.tuning.config import TuneConfig
from qtune.tuning.contenders import confirm_rounds
from qtune.tuning.engine import UnitFailure, UnitOutcome, drive
from qtune.tuning.history import History
from qtune.tuning.session import TuningSession, WorkUnit
from qtune.tuning.space import TuningSpace

AccuracyModel = Callable[[TuneConfig], float]
SpeedModel = Callable[[TuneConfig], "float | dict[str, Any]"]
"""A speedup (the interval is +-half_width around it), or a trial record's speed dict {batch: measurement}."""


def speed_measurement(speedup: float, half_width: float = 0.05, batch_size: int = 32,
                      fp32_ms: float = 10.0) -> SpeedMeasurement:
    return SpeedMeasurement(batch_size=batch_size, p50_ms=fp32_ms / speedup, p90_ms=fp32_ms / speedup * 1.1,
                            fp32_p50_ms=fp32_ms, fp32_p90_ms=fp32_ms * 1.1, speedup=speedup,
                            low=speedup * (1 - half_width), high=speedup * (1 + half_width), rounds=7,
                            runs_per_window=5, threads=1, seconds=1.0)


def int8_share_speed(config: TuneConfig, full: float = 1.8) -> float:
    """Speedup grows with the share of quantized ops: all int8 -> `full`, all fp32 -> ~0.9 (Q/DQ)."""
    ops = list(config.ops.values())
    share = sum(1 for op in ops if not op.is_fp32) / max(1, len(ops))
    return 0.9 + (full - 0.9) * share


@dataclass
class SimulatedExecutor:
    spec: JobSpec
    space: TuningSpace
    accuracy: AccuracyModel
    speed: SpeedModel = int8_share_speed
    baseline_accuracy: float = 0.95
    capacity: int = 1
    order: str = "index"
    """Order finished units are returned in: index, reverse, or shuffled (seeded)."""
    half_width: float = 0.05
    fail_trials: set[int] = field(default_factory=set)
    failures: dict[int, tuple[str, str]] = field(default_factory=dict)
    """trial index -> (reason, message) of its failure (fail_trials fail as ("Crashed", "simulated crash"))."""
    started: list[str] = field(default_factory=list)
    units: dict[str, WorkUnit] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        self.capacity = self.spec.tuning.parallel_trials if self.capacity == 1 else self.capacity
        self._random = random.Random(self.seed)

    def running(self) -> set[str]:
        return set(self.units)

    def start(self, unit: WorkUnit) -> None:
        self.started.append(unit.id)
        self.units[unit.id] = unit

    def cancel(self, unit_ids: list[str]) -> None:
        for unit_id in unit_ids:
            self.units.pop(unit_id, None)

    def _batch(self) -> int:
        return max(self.spec.benchmark.batch_sizes)

    def _result(self, unit: WorkUnit) -> UnitOutcome:
        batch = self._batch()
        if unit.id == UnitKind.BASELINE:
            return UnitOutcome(unit.id, BaselineResult(accuracy=self.baseline_accuracy, metric="top1",
                                                       latency_ms={str(batch): 10.0}, model_size_bytes=4000),
                               self.space)
        if unit.id == UnitKind.CONFIRM:  # the runner's passes (qtune/runner/confirm.py) over the modelled figures
            def measure(names: list[str]) -> dict[str, dict[str, SpeedMeasurement]]:
                return {name: self._speed(unit.candidate_configs[name], self.half_width / 2)
                        for name in names}

            speed = confirm_rounds(measure, [str(i) for i in unit.candidates], str(batch))
            return UnitOutcome(unit.id, ConfirmResult(candidates=list(unit.candidates), speed=speed))
        assert unit.trial is not None and unit.tune_config is not None
        if unit.trial in self.failures:
            return UnitOutcome(unit.id, UnitFailure(*self.failures[unit.trial]))
        if unit.trial in self.fail_trials:
            return UnitOutcome(unit.id, UnitFailure("Crashed", "simulated crash"))
        config = unit.tune_config
        accuracy = self.accuracy(config)
        result = TrialResult(trial=unit.trial, status="succeeded", config_key=config.key(), accuracy=accuracy,
                             model_size_bytes=1000 + 100 * len(config.fp32_ops()),
                             model_path=f"/sim/trials/{unit.trial}/model")
        passes = accuracy >= self.baseline_accuracy * (1 - (self.spec.tuning.accuracy_criterion.relative or 0))
        if passes:
            result.speed = self._speed(config, self.half_width)
        return UnitOutcome(unit.id, result)

    def _speed(self, config: TuneConfig, half_width: float) -> dict[str, SpeedMeasurement]:
        modelled = self.speed(config)
        if isinstance(modelled, dict):
            return {k: SpeedMeasurement.model_validate(v) for k, v in modelled.items()}
        batch = self._batch()
        return {str(batch): speed_measurement(float(modelled), half_width, batch)}

    def poll(self, wait: float) -> list[UnitOutcome]:
        ids = sorted(self.units, key=lambda u: (len(u), u))
        if self.order == "reverse":
            ids.reverse()
        elif self.order == "shuffled":
            self._random.shuffle(ids)
        outcomes = [self._result(self.units[unit_id]) for unit_id in ids]
        self.units.clear()
        return outcomes


class FakeClock:
    """A clock for TuningSession(clock=...): it reads `now`, which the test sets."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run_simulated(spec: JobSpec, space: TuningSpace, accuracy: AccuracyModel, *, speed: SpeedModel = int8_share_speed,
                  history: History | None = None, order: str = "index", half_width: float = 0.05,
                  fail_trials: set[int] | None = None, stop_after: int | None = None,
                  clock: Callable[[], float] | None = None, failures: dict[int, tuple[str, str]] | None = None,
                  slept: list[float] | None = None, baseline_accuracy: float = 0.95,
                  ) -> tuple[TuningSession, SimulatedExecutor, str | None]:
    """Drive the real session with the simulated executor; `stop_after` N recorded trials simulates an
    interruption (returns stop reason None). Time stands still except for the backoffs the session asks
    for: they advance the clock at once (and are appended to `slept`)."""
    history = history or History(job="sim")
    base_clock = clock or (lambda: 0.0)
    waited = slept if slept is not None else []

    def now() -> float:
        return base_clock() + sum(waited)

    session = TuningSession(spec, history, space if history.baseline is not None else None, clock=now)
    executor = SimulatedExecutor(spec, space, accuracy, speed, order=order, half_width=half_width,
                                 fail_trials=fail_trials or set(), failures=dict(failures or {}),
                                 baseline_accuracy=baseline_accuracy)

    def interrupted() -> bool:
        return stop_after is not None and len(history.finished()) >= stop_after

    try:
        reason = drive(session, executor, lambda: None, interrupted=interrupted, poll_wait=0,
                       sleep=waited.append)
    except KeyboardInterrupt:
        return session, executor, None
    return session, executor, reason


# --- a small space and accuracy model -------------------------------------------------------------
_ACT = {"dtype": ["uint8", "int8", "fp32"], "scheme": ["asym", "sym"], "granularity": ["per_tensor"],
        "algorithm": ["minmax", "kl", "percentile"], "reduce_range": [False]}
_WEIGHT = {"dtype": ["int8", "fp32"], "scheme": ["sym"], "granularity": ["per_channel", "per_tensor"],
           "algorithm": ["minmax"]}


def capability(count: int = 24) -> dict[str, Any]:
    """An adaptor capability of `count` ops alternating MatMul (static/dynamic, with weights) and Add."""
    opwise = {}
    for i in range(count):
        op_type = "MatMul" if i % 2 == 0 else "Add"
        entry = {"activation": dict(_ACT), "approach": ["static", "dynamic"] if op_type == "MatMul" else ["static"]}
        if op_type == "MatMul":
            entry["weight"] = dict(_WEIGHT)
        opwise[(f"op{i:02d}", op_type)] = entry
    return {"optypewise": {}, "opwise": opwise, "graph_order": [f"op{i:02d}" for i in range(count)]}


def simulated_space(count: int = 24, sensitive: frozenset[str] = frozenset({"op04", "op10", "op16"}),
                    quantization: Any = None) -> TuningSpace:
    """The space of `capability(count)`; measured sensitivities make the `sensitive` ops stand out."""
    from qtune.spec.models import QuantizationSpec
    from qtune.tuning.space import build_space

    space = build_space(capability(count), quantization or QuantizationSpec(), [["MatMul", "Add"]], 100)
    space.sensitivity = {name: (5.0 + i if name in sensitive else 0.001 * i) for i, name in enumerate(space.ops)}
    return space


def sensitive_accuracy(sensitive: frozenset[str] = frozenset({"op04", "op10", "op16"}),
                       fp32: float = 0.95) -> AccuracyModel:
    """fp32 accuracy; each quantized sensitive op costs 0.10, any other 0.0002."""
    def accuracy(config: TuneConfig) -> float:
        return fp32 - sum(0.10 if name in sensitive else 0.0002 for name, op in config.ops.items() if not op.is_fp32)
    return accuracy


def job_spec(**tuning: object) -> JobSpec:
    from qtune.spec.models import JobSpec as Spec

    return Spec.model_validate({
        "model": {"framework": "onnxruntime", "path": "model.onnx"},
        "data": {"calibration": {"path": "calib.npz"}, "evaluation": {"path": "eval.npz"}},
        "tuning": {"strategy": "basic", "accuracyCriterion": {"relative": 0.01}, "maxTrials": 20, **tuning},
        "benchmark": {"batchSizes": [1, 32]},
    })
