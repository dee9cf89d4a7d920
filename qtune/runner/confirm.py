"""The final confirmation: the few best candidates re-measured against fp32 AND each other in one
interleaved session, so the winner never rests on readings taken minutes apart on a machine
whose load changed in between.

Each candidate is rebuilt from its tune config (calibration is cached per job, so this is the
conversion only): the same in a local workspace and in a pod, whatever the framework. When the
fastest still overlaps others at the deciding batch size, those contenders are measured again and
their figures pooled (`qtune.tuning.contenders`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from qtune.protocol import SUCCEEDED, ConfirmResult
from qtune.runner.context import JobContext
from qtune.tuning import codec
from qtune.tuning.config import TuneConfig
from qtune.tuning.contenders import confirm_rounds
from qtune.tuning.session import objective_batch_size

logger = logging.getLogger(__name__)


def run_confirm(context: JobContext, candidates: dict[str, dict[str, Any]]) -> ConfirmResult:
    """`candidates`: trial index (str) -> tune config."""
    from qtune.runner.benchmark import measure_against_fp32

    started = time.perf_counter()
    adaptor = context.adaptor
    models = {index: adaptor.quantize(codec.dump(codec.load(TuneConfig, config)), context.model,
                                      context.calibration_loader())
              for index, config in sorted(candidates.items(), key=lambda kv: int(kv[0]))}
    speed = confirm_rounds(lambda names: measure_against_fp32(context, {name: models[name] for name in names}),
                           list(models), str(objective_batch_size(context.spec)))
    for index, by_batch in speed.items():
        for measurement in by_batch.values():
            logger.info("confirmation: trial %s: %s", index, measurement.describe())
    return ConfirmResult(status=SUCCEEDED, candidates=[int(i) for i in models], speed=speed,
                         seconds=round(time.perf_counter() - started, 3))
