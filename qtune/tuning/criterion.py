"""The accuracy criterion: does a trial's accuracy stay within the allowed loss of the baseline?

The edge passes: with relative 0.01 and a baseline of 0.9000, an accuracy of exactly 0.8910
meets the criterion. A tiny tolerance (1e-12) absorbs floating point noise at the edge.
"""

from __future__ import annotations

from dataclasses import dataclass

from qtune.spec.models import AccuracyCriterion

_EPSILON = 1e-12


@dataclass(frozen=True)
class Criterion:
    relative: float | None
    absolute: float | None
    higher_is_better: bool = True

    @classmethod
    def from_spec(cls, spec: AccuracyCriterion) -> Criterion:
        return cls(spec.relative, spec.absolute, spec.higher_is_better)

    def threshold(self, baseline: float) -> float:
        """The worst accuracy that still passes."""
        sign = 1.0 if self.higher_is_better else -1.0
        if self.absolute is not None:
            return baseline - sign * self.absolute
        return baseline - sign * abs(baseline) * (self.relative or 0.0)

    def passes(self, accuracy: float | None, baseline: float) -> bool:
        if accuracy is None or accuracy != accuracy:  # None or NaN
            return False
        limit = self.threshold(baseline)
        if self.higher_is_better:
            return accuracy >= limit - _EPSILON
        return accuracy <= limit + _EPSILON

    def describe(self) -> str:
        direction = "higher is better" if self.higher_is_better else "lower is better"
        if self.absolute is not None:
            return f"absolute loss ≤ {self.absolute:g} ({direction})"
        return f"relative loss ≤ {100 * (self.relative or 0):g}% ({direction})"
