"""One trial end to end: quantize (calibration cached per job), evaluate, and, only when the
accuracy criterion is met, measure the speed against fp32 (a failing trial's latency decides
nothing, so it is not spent)."""

from __future__ import annotations

import hashlib
import logging
import time
import traceback
from pathlib import Path

from qtune.protocol import FAILED, SUCCEEDED, TrialResult
from qtune.runner.context import JobContext
from qtune.runner.peaks import calibration_mark, calibration_peak, memory_text, process_peak
from qtune.spec.errors import QtuneError
from qtune.tuning import codec
from qtune.tuning.config import TuneConfig
from qtune.tuning.criterion import Criterion

logger = logging.getLogger(__name__)

CANDIDATE = "candidate"


def passes_criterion(context: JobContext, accuracy: float, baseline_accuracy: float) -> bool:
    return Criterion.from_spec(context.spec.tuning.accuracy_criterion).passes(accuracy, baseline_accuracy)


def model_sha256(path: Path) -> str:
    """sha256 of a saved model: the file's bytes; for a model folder, its files' relative names and bytes in
    name order."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def run_trial(context: JobContext, config: TuneConfig, index: int, early_stopping: bool = True) -> TrialResult:
    """Run one trial. Exceptions inside the trial become a failed result with the reason, so a
    bad config is recorded rather than fatal."""
    from qtune.runner.benchmark import measure_against_fp32

    trial_dir = context.trial_dir(index)
    trial_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = TrialResult(trial=index, config_key=config.key())
    timings = result.timings
    try:
        adaptor = context.adaptor
        mark = calibration_mark(adaptor)
        quantized = adaptor.quantize(codec.dump(config), context.model, context.calibration_loader())
        timings.update({k: round(v, 4) for k, v in adaptor.timings.items()})
        result.peak_rss_bytes.update(calibration_peak(adaptor, mark))
        timings.setdefault("quantize", round(time.perf_counter() - started, 4))
        phase = time.perf_counter()
        baseline_accuracy = context.load_baseline().accuracy
        evaluation = context.evaluate(quantized, baseline_score=baseline_accuracy if early_stopping else None)
        accuracy = evaluation.score
        result.notes.extend([evaluation.note()] if evaluation.stopped_early else [])
        timings["evaluate"] = round(time.perf_counter() - phase, 4)
        result.accuracy = accuracy
        result.model_size_bytes = int(adaptor.model_size(quantized))
        if passes_criterion(context, accuracy, baseline_accuracy):
            phase = time.perf_counter()
            speed = measure_against_fp32(context, {CANDIDATE: quantized})[CANDIDATE]
            timings["benchmark"] = round(time.perf_counter() - phase, 4)
            result.speed = speed
            saved = adaptor.save_model(quantized, trial_dir / "model")
            result.model_path = str(Path(saved).resolve())
            result.model_sha256 = model_sha256(Path(saved))
        else:
            result.notes.append("not benchmarked: the accuracy criterion is not met")
        result.status = SUCCEEDED
    except (QtuneError, RuntimeError, ValueError, MemoryError, OSError, KeyError) as exc:
        logger.error("trial %s failed: %s", index, exc)
        logger.debug("%s", traceback.format_exc())
        result.status, result.reason, result.message = FAILED, "TrialError", f"{type(exc).__name__}: {exc}"[:2000]
    except Exception as exc:  # noqa: BLE001 - a framework error of any kind fails this trial only
        logger.error("trial %s crashed: %s\n%s", index, exc, traceback.format_exc())
        result.status, result.reason, result.message = FAILED, "Crashed", f"{type(exc).__name__}: {exc}"[:2000]
    timings["total"] = round(time.perf_counter() - started, 4)
    result.peak_rss_bytes.update(process_peak())
    logger.info("trial %s: %s in %.1fs%s", index, result.status, timings["total"], memory_text(result.peak_rss_bytes))
    return result
