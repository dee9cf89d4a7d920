"""Metrics of the mobile-strips example, imported by qtune from the job's folder (no PYTHONPATH); a copy of
examples/digit_strings/sequence_metrics.py, so this folder stands alone on a workspace volume.

`ExactMatch` follows the LPOT metric interface: update(preds, labels), reset(), result(). Two
optional members tell qtune more: `higher_is_better` (checked against the job's
accuracyCriterion.higherIsBetter) and `bounds(remaining_labels)`, the lowest and highest final
score still reachable, which lets qtune stop a trial's evaluation once it can no longer pass.
"""

from __future__ import annotations

import numpy as np


def decode(logits: np.ndarray) -> np.ndarray:
    """[batch, positions, classes] scores -> the digit string of each sample."""
    return np.array(["".join(str(d) for d in row) for row in np.asarray(logits).argmax(axis=-1)])


class ExactMatch:
    """Share of samples whose whole decoded string equals the label (labels: unicode strings)."""

    higher_is_better = True

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.correct, self.total = 0, 0

    def update(self, preds: np.ndarray, labels: np.ndarray) -> None:
        self.correct += int((decode(preds) == np.asarray(labels)).sum())
        self.total += len(labels)

    def result(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def bounds(self, remaining_labels: np.ndarray) -> tuple[float, float]:
        left = len(remaining_labels)
        total = max(self.total + left, 1)
        return self.correct / total, (self.correct + left) / total


def character_error_rate(preds: np.ndarray, labels: np.ndarray) -> float:
    """Share of wrong characters over the whole set (lower is better): usable as
    `metric: sequence_metrics:character_error_rate` with `higherIsBetter: false`."""
    decoded = decode(preds)
    wrong = sum(sum(a != b for a, b in zip(p, t, strict=True)) for p, t in zip(decoded, labels, strict=True))
    return wrong / max(sum(len(t) for t in labels), 1)
