"""The final confirmation: the few best candidates re-measured against fp32 AND each other in one
interleaved session, so the winner never rests on readings taken minutes apart on a machine
whose load changed in between.

Each candidate is rebuilt from its tune config (calibration is cached per job, so this is the
conversion only): the same in a local workspace and in a pod, whatever the framework.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from qtune.protocol import SUCCEEDED, ConfirmResult
from qtune.runner.context import JobContext
from qtune.tuning.config import TuneConfig

logger = logging.getLogger(__name__)


def run_confirm(context: JobContext, candidates: dict[str, dict[str, Any]]) -> ConfirmResult:
    """`candidates`: trial index (str) -> tune config."""
    from qtune.runner.benchmark import measure_against_fp32

    started = time.perf_counter()
    adaptor = context.adaptor
    models = {index: adaptor.quantize(TuneConfig.from_dict(config).to_dict(), context.model,
                                      context.calibration_loader())
              for index, config in sorted(candidates.items(), key=lambda kv: int(kv[0]))}
    speed = measure_against_fp32(context, models)
    for index, by_batch in speed.items():
        for measurement in by_batch.values():
            logger.info("confirmation: trial %s: %s", index, measurement.describe())
    return ConfirmResult(status=SUCCEEDED, candidates=[int(i) for i in models], speed=speed,
                         seconds=round(time.perf_counter() - started, 3))
