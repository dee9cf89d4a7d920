"""The accuracy–speed front as a terminal table: from a run's front (`qtune tune`, `qtune status`) or from
a QuantizationJob's `status.front` (`qtune status --cluster`). Same columns, same words, either way."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from qtune.tuning.front import FrontEntry, speedup_text
from qtune.tuning.history import speed_key_text

COLUMNS = ("trial", "accuracy", "passes", "speedup [95% interval]", "figure", "model bytes", "fp32 ops", "")


def _table(title: str, rows: list[tuple[str, ...]]) -> Table:
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    return table


def _row(trial: int, accuracy: float | None, passed: bool, speed: str, confirmed: bool, size: int | None,
         fp32_ops: int | None, winner: bool) -> tuple[str, ...]:
    return (str(trial), "–" if accuracy is None else f"{accuracy:.4f}", "yes" if passed else "no", speed,
            "confirmed" if confirmed else "in-trial", "–" if size is None else str(size),
            "–" if fp32_ops is None else str(fp32_ops), "chosen" if winner else "")


def front_table(front: list[FrontEntry], batch_size: int | str) -> Table:
    rows = [_row(e.trial, e.accuracy, e.passed, speedup_text(e.speed.speedup, e.speed.low, e.speed.high),
                 e.confirmed, e.model_size_bytes, e.fp32_ops, e.winner) for e in front]
    return _table(f"accuracy–speed front at {speed_key_text(batch_size)} (most accurate first)", rows)


def status_front_table(front: dict[str, Any]) -> Table:
    """`status.front` of a QuantizationJob (camelCase, at most a few entries around the winner)."""
    entries = [e for e in front.get("entries") or [] if isinstance(e, dict)]
    rows = [_row(int(e.get("trial", -1)), e.get("accuracy"), bool(e.get("passed")),
                 speedup_text(float(e.get("speedup", 0.0)), float(e.get("low", 0.0)), float(e.get("high", 0.0))),
                 bool(e.get("confirmed")), e.get("modelSizeBytes"), e.get("fp32Ops"), bool(e.get("winner")))
            for e in entries]
    shown = f"{len(entries)} of {front.get('total', len(entries))}"
    return _table(f"accuracy–speed front at batch {front.get('batchSize')} ({shown}, most accurate first)", rows)
