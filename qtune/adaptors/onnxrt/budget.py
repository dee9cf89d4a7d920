"""The memory budget of one calibration, and the chunks it allows (pure arithmetic; no ONNX Runtime).

A sample in flight costs what one probe sample measured (`calibration.probe_sample_bytes`); a
collection call of `chunk` samples holds about chunk x that x HELD_OVERHEAD, which must stay within
the budget: spec.data.calibration.memoryLimit or the default, and in a container with a memory limit
at most CONTAINER_SHARE of what the limit leaves free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from qtune.adaptors.memory import human_bytes

logger = logging.getLogger(__name__)

CALIBRATION_BATCH = 16
"""Samples per model run and collection call at most (fewer when the memory budget allows fewer in flight).
One run per call: ORT's histogram collector stacks a call's outputs, so they must have one shape."""
MEMORY_FIELD = "spec.data.calibration.memoryLimit"
DEFAULT_MEMORY_LIMIT = 2 << 30
"""What a calibration may add to its process when the spec does not say (2 GiB)."""
CONTAINER_SHARE = 0.5
"""In a container with a memory limit, a calibration takes at most this share of what the limit leaves free."""
HELD_OVERHEAD = 1.25
"""Peak added per sample in flight / the probe's estimate: 1.1 measured (PP-OCRv4 det, KL, 4 samples a
call), plus room for the histogram collector's copies of one tensor."""


@dataclass(frozen=True)
class MemoryBudget:
    """What one calibration may add to its process, and where that figure came from."""

    limit_bytes: int
    source: str

    def describe(self) -> str:
        return f"{human_bytes(self.limit_bytes)} ({self.source})"


def memory_budget(requested: int | None, container_limit: int | None = None,
                  process_rss: int | None = None) -> MemoryBudget:
    """The budget of a calibration: `requested` (spec.data.calibration.memoryLimit, bytes) or the
    default, and in a container with a memory limit at most CONTAINER_SHARE of what the limit leaves
    free beside the process's present RSS (an explicit value above that is lowered, with a warning)."""
    chosen = MemoryBudget(requested, MEMORY_FIELD) if requested is not None else \
        MemoryBudget(DEFAULT_MEMORY_LIMIT, f"the default; set {MEMORY_FIELD} to change it")
    if container_limit is None:
        return chosen
    free = max(0, container_limit - (process_rss or 0))
    cap = int(free * CONTAINER_SHARE)
    if chosen.limit_bytes <= cap:
        return chosen
    if requested is not None:
        logger.warning("%s: %s is more than half of what the container's memory limit %s leaves free (%s): "
                       "calibrating within %s", MEMORY_FIELD, human_bytes(requested), human_bytes(container_limit),
                       human_bytes(free), human_bytes(cap))
    return MemoryBudget(cap, f"half of what the container's memory limit {human_bytes(container_limit)} leaves "
                             f"free")


@dataclass(frozen=True)
class ChunkPlan:
    """How the samples are collected: `chunk` samples per collection call (one model run each)."""

    sample_bytes: int
    """Memory one sample in flight adds (measured on a probe sample)."""
    chunk: int


def plan_chunks(sample_bytes: int, budget: MemoryBudget, count: int) -> ChunkPlan:
    """As many samples per collection call (up to CALIBRATION_BATCH) as keep chunk x sample_bytes x
    HELD_OVERHEAD within the budget; at least one: a sample above the budget is collected alone, with a
    warning."""
    fits = int(budget.limit_bytes // max(1.0, sample_bytes * HELD_OVERHEAD))
    if fits < 1:
        logger.warning("%s: one calibration sample needs about %s, more than the budget %s: calibrating one "
                       "sample at a time; the peak will exceed the budget", MEMORY_FIELD,
                       human_bytes(sample_bytes * HELD_OVERHEAD), budget.describe())
    return ChunkPlan(sample_bytes=int(sample_bytes), chunk=max(1, min(count, fits, CALIBRATION_BATCH)))
