"""Scoring a model: a metric over (outputs, labels) batches, or the user's evaluation function, with
early stopping when the accuracy criterion can no longer be met.

Early stopping: after every batch the metric's `bounds(remaining_targets)` gives the lowest and
highest final result still reachable, whatever the model predicts for the samples not seen yet
(counting metrics know it: top1/topk/f1 and cosine from the remaining sample count or labels, mse
from the error already accumulated). When even the best reachable result misses the pass
threshold, the rest of the evaluation decides nothing: it stops, and the score reported is that
best reachable result, which fails the criterion exactly as the full evaluation would have. A
trial that passes is never cut short (its final score lies within every bound on the way), so the
accuracy decision is the same with and without early stopping; only failing trials get cheaper.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qtune.adaptors import Adaptor
from qtune.data import DataLoader, Metric
from qtune.protocol import BOUND_WORDS, EARLY_STOP_NOTE
from qtune.spec.errors import DataError, QtuneError

logger = logging.getLogger(__name__)

MARGIN = 1e-9
"""Relative slack kept between a bound and the threshold before stopping (float rounding); it is far
wider than the criterion's own 1e-12 edge tolerance, so a stop is always a certain failure."""


@dataclass
class EvaluationResult:
    """One model's score. With `stopped_early`, `score` is the best result still reachable when the
    evaluation stopped (it fails the criterion); `samples` of `total` samples were evaluated."""

    score: float
    metric: str
    stopped_early: bool = False
    samples: int = 0
    total: int = 0
    seconds: float = 0.0
    threshold: float | None = None
    higher_is_better: bool = True

    def note(self) -> str | None:
        """The line a report or trial record shows when the evaluation stopped early (protocol.EARLY_STOP_NOTE)."""
        if not self.stopped_early:
            return None
        return (f"{EARLY_STOP_NOTE} after {self.samples} of {self.total} samples: {self.metric} can reach "
                f"{BOUND_WORDS[self.higher_is_better]} {self.score:.6g}, the criterion needs {self.threshold:.6g}")


@dataclass
class StopRule:
    """Stop once the criterion's threshold is out of reach in the metric's direction."""

    threshold: float
    higher_is_better: bool = True

    def out_of_reach(self, bounds: tuple[float, float] | None) -> float | None:
        """The reachable score that still fails (the best one), or None while passing is possible."""
        if bounds is None:
            return None
        low, high = bounds
        slack = MARGIN * max(1.0, abs(self.threshold))
        if self.higher_is_better and high < self.threshold - slack:
            return high
        if not self.higher_is_better and low > self.threshold + slack:
            return low
        return None


class _CountingMetric(Metric):
    """Passes everything to the real metric and counts the samples it was updated with, so the
    bounds see exactly the samples the metric has not (even if an adaptor prefetches batches)."""

    def __init__(self, inner: Metric) -> None:
        self.inner = inner
        self.seen = 0
        self.higher_is_better = inner.higher_is_better
        self.needs_reference = inner.needs_reference
        self.name = inner.name

    def update(self, outputs: np.ndarray, targets: np.ndarray) -> None:
        self.inner.update(outputs, targets)
        self.seen += len(targets) if targets is not None else len(outputs)

    def result(self) -> float:
        return self.inner.result()

    def reset(self) -> None:
        self.inner.reset()
        self.seen = 0

    def bounds(self, remaining: np.ndarray) -> tuple[float, float] | None:
        return self.inner.bounds(remaining)


@dataclass
class _StoppingLoader:
    """The evaluation loader, ending early once `rule` says the threshold is out of reach."""

    loader: DataLoader
    metric: _CountingMetric
    rule: StopRule
    stopped_with: float | None = None
    checks: int = field(default=0)

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        targets = self.loader.dataset.labels
        for batch in self.loader:
            if self.metric.seen and targets is not None:
                self.checks += 1
                reachable = self.rule.out_of_reach(self.metric.bounds(targets[self.metric.seen:]))
                if reachable is not None:
                    self.stopped_with = reachable
                    return
            yield batch


def evaluate_metric(adaptor: Adaptor, model: Any, loader: DataLoader, metric: Metric, name: str,
                    rule: StopRule | None = None) -> EvaluationResult:
    """Score `model` with the adaptor's own `evaluate` (custom adaptors keep their loop), stopping
    early under `rule` when the metric can bound its final result."""
    started = time.perf_counter()
    total = len(loader.dataset)
    counting = _CountingMetric(metric)
    metric.reset()
    stopping = _StoppingLoader(loader, counting, rule) if rule is not None else None
    score = adaptor.evaluate(model, stopping if stopping is not None else loader, metric=counting)
    seconds = time.perf_counter() - started
    if stopping is not None and stopping.stopped_with is not None:
        logger.info("%s after %d of %d samples: %s can reach %s %.6g, the criterion needs %.6g", EARLY_STOP_NOTE,
                    counting.seen, total, name, BOUND_WORDS[rule.higher_is_better] if rule else "",
                    stopping.stopped_with, rule.threshold if rule else float("nan"))
        assert rule is not None
        return EvaluationResult(float(stopping.stopped_with), name, True, counting.seen, total, seconds,
                                rule.threshold, rule.higher_is_better)
    return EvaluationResult(_finite(float(score), name), name, False, counting.seen or total, total, seconds,
                            rule.threshold if rule else None)


def _finite(score: float, name: str) -> float:
    if math.isnan(score):
        logger.warning("%s returned NaN", name)
    return score


class RunnableModel:
    """What an evalFunc receives: call it on a dict of named numpy inputs (or one array for a
    one-input model) and get the list of model outputs (numpy arrays), whatever the framework.

    `input_names` lists the inputs; `framework` names the adaptor; `native` is the framework's own
    model object (an OnnxModel path handle, a torch module wrapper) for advanced use."""

    def __init__(self, adaptor: Adaptor, model: Any, input_names: list[str]) -> None:
        self._adaptor, self.native, self.input_names = adaptor, model, list(input_names)
        self.framework = adaptor.name or type(adaptor).__name__

    def __call__(self, inputs: dict[str, Any] | np.ndarray) -> list[np.ndarray]:
        if not isinstance(inputs, dict):
            if len(self.input_names) != 1:
                raise DataError(f"the model has inputs {self.input_names}: call it with a dict keyed by input name")
            inputs = {self.input_names[0]: inputs}
        return [np.asarray(output) for output in self._adaptor.run(self.native, dict(inputs))]

    def __repr__(self) -> str:
        return f"RunnableModel({self.framework}, inputs={self.input_names})"


def evaluate_function(adaptor: Adaptor, model: Any, function: Callable[[Any], Any], name: str,
                      input_names: list[str]) -> EvaluationResult:
    """Score `model` with the user's evalFunc(model) -> float."""
    started = time.perf_counter()
    runnable = RunnableModel(adaptor, model, input_names)
    try:
        value = function(runnable)
    except QtuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code may raise anything
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise DataError(f"spec.data.evaluation.evalFunc: {name} raised {type(exc).__name__}: {first}") from None
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise DataError(f"spec.data.evaluation.evalFunc: {name} must return a number (the score), got "
                        f"{type(value).__name__}") from None
    return EvaluationResult(_finite(score, name), name, False, 0, 0, time.perf_counter() - started)


# --- checks of the labels against the metric, before any model runs ---------------------------------------
_CLASS_METRICS = ("top1", "topk", "f1")


def _kind(dtype: np.dtype) -> str:
    return {"U": "string", "S": "bytes", "O": "object", "M": "datetime"}.get(dtype.kind, str(dtype)) + f" ({dtype})"


def check_labels(metric_name: str, labels: np.ndarray | None, labels_key: str, source: str,
                 reference_metric: bool) -> None:
    """One line naming the field when the evaluation labels cannot feed the metric."""
    if reference_metric:
        return
    if labels is None:
        raise DataError(
            f"spec.data.evaluation: {source} has no '{labels_key}' array, which metric {metric_name} needs "
            f"(one label per sample, along axis 0); add it, name another array with "
            f"spec.data.evaluation.labels, or use metric cosine (compares with the fp32 outputs, no labels)"
        )
    kind = labels.dtype.kind
    if metric_name == "mse" and kind not in "biuf":
        raise DataError(f"spec.data.evaluation.metric: mse compares numbers, but the '{labels_key}' array of "
                        f"{source} holds {_kind(labels.dtype)} values; allowed: numeric labels, or a metric of "
                        "your own")
    if metric_name in _CLASS_METRICS:
        if kind not in "biuf":
            raise DataError(
                f"spec.data.evaluation.metric: {metric_name} compares class indices, but the '{labels_key}' array "
                f"of {source} holds {_kind(labels.dtype)} values; allowed: integer labels, or a metric of your own "
                "that reads them (metric: module:Name)"
            )
        if kind == "f" and not np.all(np.isfinite(labels) & (labels == np.round(labels))):
            raise DataError(f"spec.data.evaluation.metric: {metric_name} needs integer class indices; the "
                            f"'{labels_key}' array of {source} holds non-integer values (use mse for regression)")
        if labels.ndim > 1 and int(np.prod(labels.shape[1:])) != 1:
            raise DataError(
                f"spec.data.evaluation.metric: {metric_name} needs one class index per sample (shape [N]); the "
                f"'{labels_key}' array of {source} has shape {list(labels.shape)} (one-hot? use argmax)"
            )
