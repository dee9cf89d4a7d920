"""Peak memory of a unit's process, for its result: while it calibrated, and in all."""

from __future__ import annotations

from qtune.adaptors.memory import human_bytes, process_peak_bytes


def calibration_mark(adaptor: object) -> int:
    """Where the adaptor's list of calibration peaks stands now (see `calibration_peak`)."""
    return len(getattr(adaptor, "calibration_peaks", None) or [])


def calibration_peak(adaptor: object, since: int = 0) -> dict[str, int]:
    """{"calibration": bytes}: the largest peak RSS of the calibrations the adaptor measured since
    `since` (a `calibration_mark`); {} when it measured none (all cached) or does not report them."""
    peaks = (getattr(adaptor, "calibration_peaks", None) or [])[since:]
    return {"calibration": int(max(peaks))} if peaks else {}


def process_peak() -> dict[str, int]:
    """{"total": the process's peak RSS so far} ({} off Linux)."""
    peak = process_peak_bytes()
    return {"total": int(peak)} if peak else {}


def memory_text(peaks: dict[str, int] | None) -> str:
    """", calibration peak RSS 1.85 GiB" for a log line; "" when no calibration was measured."""
    peak = (peaks or {}).get("calibration")
    return f", calibration peak RSS {human_bytes(peak)}" if peak else ""
