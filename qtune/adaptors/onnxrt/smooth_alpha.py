"""SmoothQuant's alpha chosen per layer (`smoothQuant: {alpha: per_layer}`).

One alpha for the whole model is a compromise: a group whose activation has 50x outliers wants most of them
moved into its weights (alpha near 0.8), a group with mild outliers and a fragile weight wants little (0.3 or
none). Per layer, each smoothed group takes the alpha of `PER_LAYER_GRID` whose int8 error on real calibration
rows is lowest, where the int8 error is what static int8 does to that group's output:

    error(s) = sum over the group's MatMuls of mean((Q_x(X / s) . Q_w(diag(s) W) - X W)^2) / mean((X W)^2)

with Q_x the activation's per-tensor asymmetric uint8 rounding (min/max range) and Q_w the weight's
symmetric int8 rounding per output channel (the adaptor's defaults for static int8). Not smoothing (s = 1)
competes too: a group that smoothing does not help is left alone, and on a post-norm model that also saves
the fp32 Mul it would need (smooth_quant.py). This is a local, closed-form search on calibration rows: no
trial, no model run beyond the calibration pass that measures max|X| anyway.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

PER_LAYER_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""The alphas each group chooses from."""
SAMPLE_BYTES = 8 * 1024 * 1024
"""Calibration rows kept per activation (float32), at most: 8 MiB is 5,461 rows of 384 channels, 1,024 of 2,048."""
MAX_ROWS = 4096


def row_budget(channels: int) -> int:
    """Rows of an activation with `channels` channels kept for the alpha search."""
    return max(64, min(MAX_ROWS, SAMPLE_BYTES // (4 * max(channels, 1))))


class RowSample:
    """An evenly thinned sample of an activation's rows (all but its last axis flattened), bounded in size."""

    def __init__(self, channels: int) -> None:
        self.limit = row_budget(channels)
        self.parts: list[np.ndarray] = []
        self.count = 0

    def add(self, value: np.ndarray) -> None:
        rows = np.asarray(value, dtype=np.float32).reshape(-1, value.shape[-1])
        step = max(1, rows.shape[0] // self.limit)
        self.parts.append(rows[::step][: self.limit].copy())
        self.count += self.parts[-1].shape[0]
        if self.count > 2 * self.limit:  # halve what is kept: every other row
            merged = np.concatenate(self.parts)[::2]
            self.parts, self.count = [merged], merged.shape[0]

    def rows(self) -> np.ndarray:
        merged = np.concatenate(self.parts) if self.parts else np.zeros((0, 0), np.float32)
        step = max(1, merged.shape[0] // self.limit)
        return merged[::step][: self.limit]


def _activation_int8(x: np.ndarray) -> np.ndarray:
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (high - low) / 255.0 or 1.0
    zero = np.round(-low / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def _weight_int8(w: np.ndarray) -> np.ndarray:
    """Symmetric int8 per output channel of a [K, N] weight."""
    scale = np.abs(w).max(axis=0, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    return np.clip(np.round(w / scale), -127, 127) * scale


def int8_error(x: np.ndarray, weights: Iterable[np.ndarray], scale: np.ndarray | None) -> float:
    """The group's relative output error under static int8 with smoothing factor `scale` (None: unsmoothed);
    `weights` are [K, N] (input channels first)."""
    x = x.astype(np.float64)
    s = np.ones(x.shape[1]) if scale is None else scale.astype(np.float64)
    quantized_x = _activation_int8(x / s)
    total = 0.0
    for weight in weights:
        w = weight.astype(np.float64)
        reference = x @ w
        approx = quantized_x @ _weight_int8(w * s[:, None])
        total += float(np.mean((approx - reference) ** 2) / max(float(np.mean(reference**2)), 1e-30))
    return total


def choose_alpha(x: np.ndarray, weights: list[np.ndarray], scale_at: dict[float, np.ndarray]
                 ) -> tuple[float | None, dict[str, float]]:
    """The alpha of `scale_at` (alpha -> s) with the lowest int8 error on rows `x`, or None when not smoothing
    is at least as good; with every error, by alpha ("off": unsmoothed), rounded for the record."""
    errors = {"off": int8_error(x, weights, None)}
    errors.update({f"{alpha:g}": int8_error(x, weights, scale) for alpha, scale in scale_at.items()})
    best = min(scale_at, key=lambda alpha: errors[f"{alpha:g}"])
    chosen = best if errors[f"{best:g}"] < errors["off"] else None
    return chosen, {key: float(f"{value:.4g}") for key, value in errors.items()}
