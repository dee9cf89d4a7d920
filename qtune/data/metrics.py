"""Built-in metrics. Each accumulates batches of model outputs and targets.

`cosine` and (without labels) `mse` compare against the fp32 model's outputs: the runner
passes those as targets, so they measure how far int8 drifts from fp32.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Metric(ABC):
    higher_is_better: bool = True
    needs_reference: bool = False
    """True when the targets are the fp32 model's outputs rather than data-set labels."""

    @abstractmethod
    def update(self, outputs: np.ndarray, targets: np.ndarray) -> None: ...

    @abstractmethod
    def result(self) -> float: ...


class TopK(Metric):
    def __init__(self, k: int = 1) -> None:
        self.k, self.correct, self.total = k, 0, 0

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
    def __init__(self) -> None:
        self.predictions: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []

    def update(self, outputs: np.ndarray, targets: np.ndarray) -> None:
        scores = outputs.reshape(len(outputs), -1)
        predicted = scores.argmax(axis=1) if scores.shape[1] > 1 else (scores[:, 0] > 0.5).astype(np.int64)
        self.predictions.append(predicted)
        self.targets.append(np.asarray(targets).reshape(-1).astype(np.int64))

    def result(self) -> float:
        predicted, truth = np.concatenate(self.predictions), np.concatenate(self.targets)
        scores = []
        for label in np.unique(np.concatenate([predicted, truth])):
            tp = np.sum((predicted == label) & (truth == label))
            fp = np.sum((predicted == label) & (truth != label))
            fn = np.sum((predicted != label) & (truth == label))
            scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
        return float(np.mean(scores)) if scores else 0.0


class MeanSquaredError(Metric):
    higher_is_better = False

    def __init__(self) -> None:
        self.sum, self.count = 0.0, 0

    def update(self, outputs: np.ndarray, targets: np.ndarray) -> None:
        diff = outputs.astype(np.float64).reshape(-1) - np.asarray(targets, np.float64).reshape(-1)
        self.sum += float(np.sum(diff * diff))
        self.count += diff.size

    def result(self) -> float:
        return self.sum / self.count if self.count else 0.0


class CosineSimilarity(Metric):
    """Mean cosine similarity between each sample's output and the fp32 output."""

    needs_reference = True

    def __init__(self) -> None:
        self.sum, self.count = 0.0, 0

    def update(self, outputs: np.ndarray, targets: np.ndarray) -> None:
        a = outputs.reshape(len(outputs), -1).astype(np.float64)
        b = np.asarray(targets).reshape(len(outputs), -1).astype(np.float64)
        denominator = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosine = np.where(denominator > 0, np.sum(a * b, axis=1) / np.maximum(denominator, 1e-30), 1.0)
        self.sum += float(np.sum(cosine))
        self.count += len(a)

    def result(self) -> float:
        return self.sum / self.count if self.count else 0.0


def create_metric(name: str, k: int = 5, has_labels: bool = True) -> Metric:
    """Metric by its spec name. `mse` without labels compares against the fp32 outputs."""
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
    raise ValueError(f"unknown metric {name!r}; allowed: top1, topk, f1, mse, cosine")
