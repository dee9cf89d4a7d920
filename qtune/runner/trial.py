"""One trial end to end: quantize (calibration cached per job), evaluate, benchmark, record."""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

from qtune.runner.baseline import measure_latency
from qtune.runner.context import JobContext
from qtune.spec.errors import QtuneError
from qtune.tuning.config import TuneConfig
from qtune.tuning.history import FAILED, SUCCEEDED, write_json_atomic

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"


def run_trial(context: JobContext, config: TuneConfig, index: int | str) -> dict[str, Any]:
    """Run one trial and return its result (also written to trials/<index>/result.json).

    Exceptions inside the trial are turned into a failed result with the reason, so a bad
    config is recorded rather than fatal."""
    trial_dir = context.trial_dir(index)
    trial_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict[str, Any] = {"index": index, "config_key": config.key(), "status": FAILED, "timings": {}}
    timings: dict[str, float] = result["timings"]
    try:
        adaptor = context.adaptor
        quantized = adaptor.quantize(config.to_dict(), context.model, context.calibration_loader())
        timings.update({k: round(v, 4) for k, v in adaptor.timings.items()})
        timings.setdefault("quantize", round(time.perf_counter() - started, 4))
        phase = time.perf_counter()
        accuracy = adaptor.evaluate(quantized, context.targets_loader(), metric=context.new_metric())
        timings["evaluate"] = round(time.perf_counter() - phase, 4)
        phase = time.perf_counter()
        p50, p90, fp32_p50 = measure_latency(context, quantized, reference=context.model)
        timings["benchmark"] = round(time.perf_counter() - phase, 4)
        saved = adaptor.save_model(quantized, trial_dir / "model")
        result.update(
            status=SUCCEEDED,
            accuracy=float(accuracy),
            latency_ms=p50,
            latency_p90_ms=p90,
            fp32_latency_ms=fp32_p50,
            model_size_bytes=int(adaptor.model_size(quantized)),
            model_path=str(Path(saved).resolve()),
        )
    except (QtuneError, RuntimeError, ValueError, MemoryError, OSError, KeyError) as exc:
        logger.error("trial %s failed: %s", index, exc)
        logger.debug("%s", traceback.format_exc())
        result.update(reason="TrialError", message=f"{type(exc).__name__}: {exc}"[:2000])
    except Exception as exc:  # noqa: BLE001 - a framework error of any kind fails this trial only
        logger.error("trial %s crashed: %s\n%s", index, exc, traceback.format_exc())
        result.update(reason="Crashed", message=f"{type(exc).__name__}: {exc}"[:2000])
    timings["total"] = round(time.perf_counter() - started, 4)
    write_json_atomic(trial_dir / RESULT_FILE, result)
    return result
