"""Write report.md, report.html and accuracy_latency.png for a finished run."""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path

from qtune.spec.models import QuantizationJob
from qtune.tuning.history import History, TrialRecord
from qtune.tuning.session import TuningSession, objective_batch_size

logger = logging.getLogger(__name__)
PLOT_FILE = "accuracy_latency.png"


def _plot(path: Path, history: History, session: TuningSession, best: TrialRecord | None, batch: int) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: the report has no plot")
        return False
    baseline = session.baseline
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=110)

    def relative(t: TrialRecord) -> float | None:
        """Latency relative to fp32, both measured interleaved in the trial (1.0 = as fast as fp32)."""
        speedup = t.speedup(batch)
        return 1.0 / speedup if speedup else None

    ok = [t for t in history.trials if t.ok and relative(t) is not None]
    for passed, colour, label in ((True, "tab:green", "meets criterion"), (False, "tab:red", "misses criterion")):
        points = [t for t in ok if bool(t.passed) == passed]
        axes.scatter([relative(t) for t in points], [t.accuracy for t in points], c=colour, label=label,
                     alpha=0.8, edgecolors="none")
        for t in points:
            axes.annotate(str(t.index), (relative(t), t.accuracy), fontsize=7, xytext=(3, 3),
                          textcoords="offset points")
    axes.scatter([1.0], [baseline.accuracy], marker="s", s=80, c="tab:blue", label="fp32 baseline")
    if best is not None and relative(best) is not None:
        axes.scatter([relative(best)], [best.accuracy], marker="*", s=260, c="gold", edgecolors="black",
                     label=f"best (trial {best.index})")
    axes.axhline(session.criterion.threshold(baseline.accuracy), color="grey", linestyle="--", linewidth=1,
                 label="criterion")
    axes.set_xlabel(f"latency p50 at batch {batch}, relative to fp32 (lower is faster)")
    axes.set_ylabel("accuracy")
    axes.set_title("qtune: accuracy against latency per trial")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _rows(history: History, batch: int) -> list[list[str]]:
    rows = []
    for t in history.trials:
        timings = t.timings or {}
        rows.append([
            str(t.index), t.status, _fmt(t.accuracy), "yes" if t.passed else "no",
            _fmt(t.latency(batch), 3), _fmt(t.speedup(batch), 2), str(len(t.config.fp32_ops())), t.config.approach,
            " / ".join(_fmt(timings.get(k), 2) for k in ("calibration", "quantize", "evaluate", "benchmark")),
            (t.reason or "") + (f": {t.message}" if t.message else ""),
        ])
    return rows


HEADERS = ["trial", "status", "accuracy", "passes", "latency ms", "speedup", "fp32 ops", "approach",
           "calib / quant / eval / bench s", "reason"]


def write_report(folder: Path, job: QuantizationJob, session: TuningSession, history: History,
                 best: TrialRecord | None, stop_reason: str) -> None:
    batch = objective_batch_size(job.spec)
    baseline = session.baseline
    has_plot = _plot(folder / PLOT_FILE, history, session, best, batch)
    base_latency = baseline.latency_ms.get(str(batch))
    summary = [
        ("job", job.name),
        ("framework", job.spec.model.framework),
        ("strategy", job.spec.tuning.strategy),
        ("criterion", session.criterion.describe()),
        ("stopped", f"{stop_reason} ({session.outcome(stop_reason)})"),
        ("trials", str(len(history.trials))),
        ("fp32 accuracy", _fmt(baseline.accuracy)),
        (f"fp32 latency p50, batch {batch}", f"{_fmt(base_latency, 3)} ms"),
    ]
    if best is not None:
        speedup = best.speedup(batch)
        summary += [
            ("best trial", str(best.index)),
            ("int8 accuracy", _fmt(best.accuracy)),
            (f"int8 latency p50, batch {batch}", f"{_fmt(best.latency(batch), 3)} ms"),
            ("speedup", f"{_fmt(speedup, 2)}× (fp32 and int8 measured interleaved in the same trial)"),
            ("model size", f"{baseline.model_size_bytes} → {best.model_size_bytes} bytes"),
            ("ops kept in fp32", ", ".join(best.config.fp32_ops()) or "none"),
        ]
    else:
        summary.append(("best trial", "no configuration meets the criterion"))
    notes = session.space.notes

    md = [f"# qtune report: {job.name}", ""]
    md += [f"- **{k}**: {v}" for k, v in summary]
    if has_plot:
        md += ["", f"![accuracy against latency]({PLOT_FILE})"]
    md += ["", "## Trials", "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    md += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in _rows(history, batch)]
    if notes:
        md += ["", "## Notes from the adaptor", ""] + [f"- `{k}`: {v}" for k, v in notes.items()]
    (folder / "report.md").write_text("\n".join(md) + "\n")

    image = ""
    if has_plot:
        encoded = base64.b64encode((folder / PLOT_FILE).read_bytes()).decode()
        image = f'<img alt="accuracy against latency" src="data:image/png;base64,{encoded}">'
    items = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in _rows(history, batch))
    note_items = "".join(f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>" for k, v in notes.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>qtune report: {html.escape(job.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:3px 8px;text-align:left;font-size:13px}}</style></head><body>
<h1>qtune report: {html.escape(job.name)}</h1><table>{items}</table>{image}
<h2>Trials</h2><table><tr>{head}</tr>{body}</table>
{f"<h2>Notes from the adaptor</h2><ul>{note_items}</ul>" if notes else ""}</body></html>
"""
    (folder / "report.html").write_text(page)
