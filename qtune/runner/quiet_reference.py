"""The quiet fp32 time of a local job: the slow-round check's reference (qtune/runner/benchmark.py).

A round whose fp32 window ran `SLOW_FACTOR` times slower than the quiet time counts as contended. The fastest
window of the measurement itself is one reference; this is the other: the fastest fp32 figure the job has
measured on this machine, the baseline's (fp32 alone) and every trusted measurement's since, kept in the
workspace (`QUIET_FILE`). A stretch of host load that outlasts one measurement, or the baseline, is then still
caught by a later quiet figure. Only outside a pod: a pod may run on another node than the one that measured.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from qtune.protocol import SpeedMeasurement

if TYPE_CHECKING:
    from qtune.runner.context import JobContext

logger = logging.getLogger(__name__)

QUIET_FILE = "fp32_quiet.json"
"""In a local job's workspace: {threads: {batch size: the fastest trusted fp32 p50 in ms}}."""


def job_quiet_fp32_ms(context: JobContext, threads: int) -> dict[str, float]:
    """The quiet time of the slow-round check per batch size (str): the fastest fp32 p50 this job measured on
    this machine with `threads` threads, the baseline's (alone) or a trusted measurement's (`QUIET_FILE`). Only
    asked outside a pod: a pod may run on another node than the one that measured it."""
    quiet = _remembered_quiet(context).get(str(threads), {})
    try:
        baseline = context.load_baseline()
    except (OSError, ValueError, TypeError, KeyError):
        return quiet
    if threads == context.benchmark_threads:
        for size, ms in (baseline.latency_ms or {}).items():
            if ms and ms > 0:
                quiet[size] = min(float(ms), quiet.get(size, float("inf")))
    return quiet


def _remembered_quiet(context: JobContext) -> dict[str, dict[str, float]]:
    try:
        stored = json.loads((context.workspace / QUIET_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(stored, dict):
        return {}
    return {str(threads): {str(size): float(ms) for size, ms in by_size.items()
                           if isinstance(ms, int | float) and ms > 0}
            for threads, by_size in stored.items() if isinstance(by_size, dict)}


def remember_quiet(context: JobContext, threads: int, size: int | str, measured: Iterable[SpeedMeasurement]) -> None:
    """Keep the fp32 p50 of a trusted wall-clock measurement in `QUIET_FILE` when it is the job's fastest yet
    (a later measurement inside a slow stretch is then caught even if its own rounds are all slow)."""
    figures = [m.fp32_p50_ms for m in measured if m.trusted and not m.busy and m.threads == threads]
    if not figures:
        return
    stored = _remembered_quiet(context)
    by_size = stored.setdefault(str(threads), {})
    if min(figures) >= by_size.get(str(size), float("inf")):
        return
    by_size[str(size)] = min(figures)
    path = context.workspace / QUIET_FILE
    try:
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(stored, sort_keys=True))
        temporary.replace(path)
    except OSError as error:  # a read-only workspace: the check falls back to the baseline's figure
        logger.debug("could not keep the quiet fp32 time in %s: %s", path, error)
