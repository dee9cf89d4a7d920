"""Built-in metrics. Each accumulates batches of model outputs and targets.

`cosine` and (without labels) `mse` compare against the fp32 model's outputs: the runner
passes those as targets, so they measure how far int8 drifts from fp32.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qtune.spec.errors import DataError, QtuneError


class Metric(ABC):
    higher_is_better: bool = True
    needs_reference: bool = False
    """True when the targets are the fp32 model's outputs rather than data-set labels."""

    name: str = ""

    @abstractmethod
    def update(self, outputs: np.ndarray, targets: np.ndarray) -> None: ...

    @abstractmethod
    def result(self) -> float: ...

    def reset(self) -> None:
        """Forget every batch (the LPOT interface); the built-ins start empty anyway."""
        self.__init__()  # type: ignore[misc]

    def bounds(self, remaining: np.ndarray) -> tuple[float, float] | None:
        """The lowest and highest final result still reachable once the samples whose targets are
        `remaining` (not seen yet) are added, whatever the model predicts for them; None when unknown.
        Early stopping of an evaluation relies on it: it must never be narrower than the truth."""
        return None


class TopK(Metric):
    def __init__(self, k: int = 1) -> None:
        self.k, self.correct, self.total = k, 0, 0
        self.name = "top1" if k == 1 else f"top{k}"

    def reset(self) -> None:
        self.correct, self.total = 0, 0

    def bounds(self, remaining: np.ndarray) -> tuple[float, float] | None:
        left = len(remaining)
        total = self.total + left
        if total == 0:
            return None
        return self.correct / total, (self.correct + left) / total

    def update(self, outputs: np.ndarray, targets: np.ndarray) -> None:
        scores = outputs.reshape(len(outputs), -1)
        targets = np.asarray(targets).reshape(-1).astype(np.int64)
        if self.k == 1:
            hits = scores.argmax(axis=1) == targets
        else:
            top = np.argpartition(-scores, kth=min(self.k, scores.shape[1]) - 1, axis=1)[:, : self.k]
            hits = (top == targets[:, None]).any(axis=1)
        self.correct += int(hits.sum())
        self.total += len(targets)

    def result(self) -> float:
        return self.correct / self.total if self.total else 0.0


class MacroF1(Metric):
    """Macro-averaged F1 over every class seen in the predictions or the labels (running counts)."""

    name = "f1"

    def __init__(self) -> None:
        self.tp: dict[int, int] = {}
        self.fp: dict[int, int] = {}
        self.fn: dict[int, int] = {}

    def reset(self) -> None:
        self.tp, self.fp, self.fn = {}, {}, {}

    @staticmethod
    def _add(counts: dict[int, int], values: np.ndarray) -> None:
        labels, numbers = np.unique(values, return_counts=True)
        for label, number in zip(labels.tolist(), numbers.tolist(), strict=True):
            counts[label] = counts.get(label, 0) + number

    def update(self, outputs: np.ndarray, targets: np.ndarray) -> None:
        scores = outputs.reshape(len(outputs), -1)
        predicted = scores.argmax(axis=1) if scores.shape[1] > 1 else (scores[:, 0] > 0.5).astype(np.int64)
        truth = np.asarray(targets).reshape(-1).astype(np.int64)
        hit = predicted == truth
        self._add(self.tp, truth[hit])
        self._add(self.fp, predicted[~hit])
        self._add(self.fn, truth[~hit])

    @staticmethod
    def _score(tp: dict[int, int], fp: dict[int, int], fn: dict[int, int]) -> float:
        classes = set(tp) | set(fp) | set(fn)
        scores = []
        for label in classes:
            t, p, n = tp.get(label, 0), fp.get(label, 0), fn.get(label, 0)
            scores.append(0.0 if t == 0 else 2 * t / (2 * t + p + n))
        return float(np.mean(scores)) if scores else 0.0

    def result(self) -> float:
        return self._score(self.tp, self.fp, self.fn)

    def bounds(self, remaining: np.ndarray) -> tuple[float, float] | None:
        # Best case: every remaining sample is predicted right. That raises each class's tp and adds no
        # fp/fn and no new class, so it maximises every per-class F1 at once (any wrong prediction
        # lowers one class's tp and raises another's fp or adds a class scoring 0).
        best = dict(self.tp)
        self._add(best, np.asarray(remaining).reshape(-1).astype(np.int64))
        return 0.0, self._score(best, self.fp, self.fn)


class MeanSquaredError(Metric):
    higher_is_better = False
    name = "mse"

    def __init__(self) -> None:
        self.sum, self.count = 0.0, 0

    def reset(self) -> None:
        self.sum, self.count = 0.0, 0

    def bounds(self, remaining: np.ndarray) -> tuple[float, float] | None:
        count = self.count + np.asarray(remaining).size
        return (self.sum / count, float("inf")) if count else None

    def update(self, outputs: np.ndarray, targets: np.ndarray) -> None:
        diff = outputs.astype(np.float64).reshape(-1) - np.asarray(targets, np.float64).reshape(-1)
        self.sum += float(np.sum(diff * diff))
        self.count += diff.size

    def result(self) -> float:
        return self.sum / self.count if self.count else 0.0


class CosineSimilarity(Metric):
    """Mean cosine similarity between each sample's output and the fp32 output."""

    needs_reference = True
    name = "cosine"

    def __init__(self) -> None:
        self.sum, self.count = 0.0, 0

    def reset(self) -> None:
        self.sum, self.count = 0.0, 0

    def bounds(self, remaining: np.ndarray) -> tuple[float, float] | None:
        left = len(remaining)
        count = self.count + left
        return ((self.sum - left) / count, (self.sum + left) / count) if count else None

    def update(self, outputs: np.ndarray, targets: np.ndarray) -> None:
        a = outputs.reshape(len(outputs), -1).astype(np.float64)
        b = np.asarray(targets).reshape(len(outputs), -1).astype(np.float64)
        denominator = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosine = np.where(denominator > 0, np.sum(a * b, axis=1) / np.maximum(denominator, 1e-30), 1.0)
        self.sum += float(np.sum(cosine))
        self.count += len(a)

    def result(self) -> float:
        return self.sum / self.count if self.count else 0.0


class Perplexity(Metric):
    """A language model's perplexity, exp(mean negative log-likelihood) of the labelled tokens: lower is better.

    Outputs are logits, [batch, positions, vocabulary] (or [batch, vocabulary] for one position per sample);
    labels are integer token ids of the same leading shape, the token each position should predict (already
    shifted by one), and a negative label (padding, a prompt not to be scored) is left out, as in most training
    code (-100). The log-softmax runs in float32 in chunks of rows, so a 32,000-word vocabulary does not need the
    whole batch in float64; the sum of log-likelihoods is kept in float64."""

    higher_is_better = False
    name = "perplexity"
    CHUNK_ROWS = 2048

    def __init__(self) -> None:
        self.nll, self.count = 0.0, 0

    def reset(self) -> None:
        self.nll, self.count = 0.0, 0

    def update(self, outputs: np.ndarray, targets: np.ndarray) -> None:
        logits = np.asarray(outputs)
        labels = np.asarray(targets)
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"spec.data.evaluation.labels: perplexity needs integer token ids, got {labels.dtype}")
        vocabulary = logits.shape[-1] if logits.ndim >= 2 else 0
        if vocabulary == 0 or logits.size // vocabulary != labels.size:
            raise DataError(f"spec.data.evaluation.labels: perplexity needs one token id per output position: "
                            f"labels {labels.shape} against logits {logits.shape} (positions x vocabulary)")
        rows, chosen = logits.reshape(-1, vocabulary), labels.reshape(-1)
        keep = chosen >= 0
        if np.any(chosen[keep] >= vocabulary):
            raise DataError(f"spec.data.evaluation.labels: token id {int(chosen[keep].max())} is outside the "
                            f"model's vocabulary of {vocabulary}")
        rows, chosen = rows[keep], chosen[keep]
        for start in range(0, len(chosen), self.CHUNK_ROWS):
            block = rows[start:start + self.CHUNK_ROWS].astype(np.float32)
            top = block.max(axis=1)
            log_normaliser = top + np.log(np.exp(block - top[:, None]).sum(axis=1))
            picked = block[np.arange(len(block)), chosen[start:start + self.CHUNK_ROWS]]
            self.nll += float(np.sum(log_normaliser.astype(np.float64) - picked.astype(np.float64)))
        self.count += len(chosen)

    def result(self) -> float:
        return float(np.exp(self.nll / self.count)) if self.count else float("inf")


def _one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class UserMetric(Metric):
    """A metric class of the user's (the LPOT interface: update(preds, labels), reset(), result()).

    Optional attributes it may have: `higher_is_better` (bool) and `bounds(remaining_labels) ->
    (low, high)` (enables early stopping, see Metric.bounds). Errors it raises become one line naming
    `spec.data.evaluation.metric`."""

    FIELD = "spec.data.evaluation.metric"

    def __init__(self, instance: Any, name: str) -> None:
        self.instance, self.name = instance, name
        declared = getattr(instance, "higher_is_better", None)
        self.higher_is_better = bool(declared) if declared is not None else True
        self.declares_direction = declared is not None

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.instance, method)(*args)
        except QtuneError:
            raise
        except Exception as exc:  # noqa: BLE001 - user code may raise anything
            raise DataError(f"{self.FIELD}: {self.name}.{method} raised {_one_line(exc)}") from None

    def update(self, outputs: np.ndarray, targets: np.ndarray) -> None:
        self._call("update", outputs, targets)

    def reset(self) -> None:
        if hasattr(self.instance, "reset"):
            self._call("reset")

    def result(self) -> float:
        return _as_score(self._call("result"), f"{self.name}.result()")

    def bounds(self, remaining: np.ndarray) -> tuple[float, float] | None:
        if not hasattr(self.instance, "bounds"):
            return None
        value = self._call("bounds", remaining)
        if value is None:
            return None
        try:
            low, high = (float(v) for v in value)
        except (TypeError, ValueError):
            raise DataError(f"{self.FIELD}: {self.name}.bounds() must return (low, high) or None, "
                            f"got {value!r}") from None
        return low, high


class FunctionMetric(Metric):
    """A function of the user's, (predictions, labels) -> float, called once over the whole set.

    Predictions and labels of all batches are concatenated along axis 0 (kept as lists when their
    shapes differ between batches)."""

    FIELD = "spec.data.evaluation.metric"

    def __init__(self, function: Callable[[Any, Any], Any], name: str) -> None:
        self.function, self.name = function, name
        self.outputs: list[np.ndarray] = []
        self.targets: list[Any] = []

    def reset(self) -> None:
        self.outputs, self.targets = [], []

    def update(self, outputs: np.ndarray, targets: np.ndarray) -> None:
        self.outputs.append(outputs)
        self.targets.append(targets)

    @staticmethod
    def _joined(parts: list[Any]) -> Any:
        if any(part is None for part in parts):
            return None
        try:
            return np.concatenate([np.asarray(part) for part in parts]) if parts else np.empty((0,))
        except ValueError:
            return [item for part in parts for item in part]

    def result(self) -> float:
        try:
            value = self.function(self._joined(self.outputs), self._joined(self.targets))
        except QtuneError:
            raise
        except Exception as exc:  # noqa: BLE001 - user code may raise anything
            raise DataError(f"{self.FIELD}: {self.name} raised {_one_line(exc)}") from None
        return _as_score(value, self.name)


def _as_score(value: Any, what: str) -> float:
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise DataError(f"spec.data.evaluation: {what} must return a number, got {type(value).__name__} "
                        f"{str(value)[:80]!r}") from None
    return score


def user_metric(entrypoint: str, base_dir: str | Path | None = None) -> Metric:
    """A `module:Name` metric: a class (instantiated without arguments) or a function."""
    from qtune.spec.entrypoints import EntrypointError, load_entrypoint

    field = "spec.data.evaluation.metric"
    target = load_entrypoint(entrypoint, field, base_dir, kind="callable",
                             allowed="module:Name of a metric class or a function (preds, labels) -> float")
    if not inspect.isclass(target):
        return FunctionMetric(target, entrypoint)
    try:
        instance = target()
    except Exception as exc:  # noqa: BLE001 - user code
        raise EntrypointError(field, f"{entrypoint}() raised {_one_line(exc)}; a metric class is created "
                                     "without arguments") from None
    missing = [m for m in ("update", "result") if not callable(getattr(instance, m, None))]
    if missing:
        raise EntrypointError(field, f"{entrypoint} has no {' or '.join(missing)} method; a metric class needs "
                                     "update(preds, labels), result() and optionally reset()")
    return UserMetric(instance, entrypoint)


def create_metric(name: str, k: int = 5, has_labels: bool = True, base_dir: str | Path | None = None) -> Metric:
    """Metric by its spec name (a built-in, or module:Name imported from the job's folder).
    `mse` without labels compares against the fp32 outputs."""
    if ":" in name:
        return user_metric(name, base_dir)
    if name == "top1":
        return TopK(1)
    if name == "topk":
        return TopK(k)
    if name == "f1":
        return MacroF1()
    if name == "mse":
        metric = MeanSquaredError()
        metric.needs_reference = not has_labels
        return metric
    if name == "cosine":
        return CosineSimilarity()
    if name == "perplexity":
        return Perplexity()
    raise ValueError(f"unknown metric {name!r}; allowed: top1, topk, f1, mse, cosine, perplexity, or module:Name")
