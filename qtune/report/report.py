"""Write report.md, report.html and accuracy_latency.png for a finished run."""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path

from qtune.protocol import SpeedMeasurement
from qtune.spec.models import QuantizationJob
from qtune.tuning.front import FrontEntry, session_front, speedup_text
from qtune.tuning.history import DECODE_KEY, History, TrialRecord, speed_key_text
from qtune.tuning.objective import confirmed_speed, speed_of
from qtune.tuning.session import TuningSession

logger = logging.getLogger(__name__)
PLOT_FILE = "accuracy_latency.png"


def _plot(path: Path, history: History, session: TuningSession, best: TrialRecord | None, batch: int,
          front: list[FrontEntry] | None = None) -> bool:
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
        """Latency relative to fp32, both measured interleaved (1.0 = as fast as fp32)."""
        measured = speed_of(history, t, batch)
        return 1.0 / measured.speedup if measured else None

    ok = [t for t in history.trials if t.ok and relative(t) is not None]
    for passed, colour, label in ((True, "tab:green", "meets criterion"), (False, "tab:red", "misses criterion")):
        points = [t for t in ok if bool(t.passed) == passed]
        axes.scatter([relative(t) for t in points], [t.accuracy for t in points], c=colour, label=label,
                     alpha=0.8, edgecolors="none")
        for t in points:
            axes.annotate(str(t.index), (relative(t), t.accuracy), fontsize=7, xytext=(3, 3),
                          textcoords="offset points")
    if front:
        axes.plot([1.0 / e.speedup for e in front], [e.accuracy for e in front], color="tab:purple", linewidth=1,
                  drawstyle="steps-pre", zorder=1)  # the edge of what the front's configs dominate
        axes.scatter([1.0 / e.speedup for e in front], [e.accuracy for e in front], s=110, facecolors="none",
                     edgecolors="tab:purple", linewidths=1.5, label="accuracy–speed front", zorder=3)
    axes.scatter([1.0], [baseline.accuracy], marker="s", s=80, c="tab:blue", label="fp32 baseline")
    if best is not None and relative(best) is not None:
        axes.scatter([relative(best)], [best.accuracy], marker="*", s=260, c="gold", edgecolors="black",
                     label=f"best (trial {best.index})")
    axes.axhline(session.criterion.threshold(baseline.accuracy), color="grey", linestyle="--", linewidth=1,
                 label="criterion")
    axes.set_xlabel(f"latency p50 at {speed_key_text(batch)}, relative to fp32 (lower is faster)")
    axes.set_ylabel("accuracy")
    axes.set_title("qtune: accuracy against latency per trial")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


BOUND_LEGEND = ("An accuracy marked ≤ (≥ for lower-is-better metrics) is not a measured score: the evaluation stopped "
                "once the criterion was out of reach, and the figure is the best the trial could still have reached.")


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _speed_text(measured: SpeedMeasurement | None) -> str:
    """A speedup and its interval; one below fp32 beyond doubt says so (a speedup of 0.76× is no speed-up)."""
    return "–" if measured is None else speedup_text(measured.speedup, measured.low, measured.high)


def speed_sentence(measured: SpeedMeasurement) -> str:
    """The winner's speed in words that say slower when it is slower, with its interval."""
    interval = f"{int(measured.confidence * 100)}% interval [{measured.low:.2f}–{measured.high:.2f}]"
    if measured.low > 1.0:
        return f"{measured.against_fp32()}, {interval}"
    return f"speedup {measured.speedup:.2f}×: {measured.against_fp32()}, {interval}"


FRONT_HEADERS = ["trial", "accuracy", "passes", "speedup [95% interval]", "figure from",
                 "faster than the row above", "model size bytes", "fp32 ops", ""]


def front_rows(front: list[FrontEntry]) -> list[list[str]]:
    """The front as table rows, most accurate first."""
    rows = []
    for entry in front:
        gain = "–" if entry.clear_gain is None else ("yes, beyond doubt" if entry.clear_gain else "within noise")
        rows.append([
            str(entry.trial), _fmt(entry.accuracy), "yes" if entry.passed else "no", _speed_text(entry.speed),
            "confirmation" if entry.confirmed else "trial", gain,
            "–" if entry.model_size_bytes is None else str(entry.model_size_bytes), str(entry.fp32_ops),
            "chosen" if entry.winner else "",
        ])
    return rows


def front_intro(front: list[FrontEntry], batch: int | str, best: TrialRecord | None) -> str:
    """What the front table is and how to use one of its configs without running again."""
    text = (f"{len(front)} config(s) that no other measured config beats on both accuracy and speedup at "
            f"{speed_key_text(batch)} (point estimates; most accurate first). To use one, take its trial number n: "
            "its tune config is the record with index n in history.json's `trials` (`tune_config`), its model the "
            "record's `model_path`.")
    if best is not None and front and not any(e.winner for e in front):
        text += (f" The chosen config, trial {best.index}, is not on it: a config at least as accurate has a "
                 "higher speedup point estimate (the winner rule counts speedups whose intervals overlap as equal).")
    return text


def _busy_mark(measured: SpeedMeasurement | None) -> str:
    """A trial-table figure from a busy machine says so (see SpeedMeasurement.caveat)."""
    if measured is None or measured.caveat() is None:
        return ""
    if not measured.trusted:
        return " (machine too busy: not trusted)"
    if measured.fell_back:
        return f" (busy: {measured.threads} thread, CPU time)"
    return " (busy)" if measured.busy else f" ({measured.contended_rounds} contended rounds left out)"


def _rows(history: History, batch: int) -> list[list[str]]:
    rows = []
    for t in history.trials:
        timings = t.timings or {}
        measured = speed_of(history, t, batch)
        rows.append([
            str(t.index), t.status, t.accuracy_text(), "yes" if t.passed else "no",
            _fmt(measured.fp32_p50_ms if measured else None, 3), _fmt(measured.p50_ms if measured else None, 3),
            _speed_text(measured) + _busy_mark(measured), str(len(t.tune_config.fp32_ops())),
            t.tune_config.approach + (f" ({weights})" if (weights := t.tune_config.weights_text()) else ""),
            " / ".join(_fmt(timings.get(k), 2) for k in ("calibration", "quantize", "evaluate", "benchmark")),
            (t.reason or "") + (f": {t.message}" if t.message else ""),
        ])
    return rows


HEADERS = ["trial", "status", "accuracy", "passes", "fp32 p50 ms", "int8 p50 ms", "speedup [95% interval]",
           "fp32 ops", "approach", "calib / quant / eval / bench s", "reason"]


def summary_items(job: QuantizationJob, session: TuningSession) -> list[tuple[str, str]]:
    """The report's summary; the winner's latencies and speedup all come from ONE measurement."""
    history = session.history
    batch = session.batch_size
    baseline = session.baseline
    assert baseline is not None
    best = session.best()
    metric = baseline.metric or job.spec.data.evaluation.metric_name
    items = [
        ("job", job.name),
        ("framework", job.spec.model.framework),
        ("strategy", job.spec.tuning.strategy),
        ("criterion", f"{session.criterion.describe()} on {metric}"),
        ("outcome", session.verdict()),
        ("search stopped", str(history.stop_reason)),
        ("trials", str(len(history.trials))),
        (f"fp32 {metric}", _fmt(baseline.accuracy)),
        (f"fp32 alone, latency p50 (baseline step; not used for speedups), {speed_key_text(batch)}",
         f"{_fmt(baseline.latency_ms.get(str(batch)), 3)} ms"),
    ]
    if best is not None:
        measured = session.best_speed()
        confirmed = confirmed_speed(history, best.index, batch) is not None
        figure = "confirmed" if confirmed else "in-trial"
        source = ("the final confirmation (best candidates and fp32 interleaved in one session)" if confirmed
                  else "the trial (fp32 and int8 interleaved in the trial's process)")
        items += [
            ("best trial", str(best.index)),
            (f"int8 {metric}", _fmt(best.accuracy)),
            ("ops kept in fp32", ", ".join(best.tune_config.fp32_ops()) or "none"),
            *([("weights", weights)] if (weights := best.tune_config.weights_text()) else []),
            ("model size", f"{baseline.model_size_bytes} → {best.model_size_bytes} bytes"),
        ]
        if measured is not None:
            items += [
                (f"speed at {speed_key_text(batch)} ({figure} figure)",
                 f"fp32 {measured.fp32_p50_ms:.3f} ms → int8 {measured.p50_ms:.3f} ms: {speed_sentence(measured)}"
                 + (f" ({1000 / measured.fp32_p50_ms:.1f} → {1000 / measured.p50_ms:.1f} tokens/s)"
                    if str(batch) == DECODE_KEY else "")),
                ("how measured", f"{source}; {measured.rounds} alternating rounds of {measured.runs_per_window} "
                                 f"runs, {measured.threads} thread(s), {measured.seconds:.1f}s; "
                                 + ("each run timed by the thread's CPU time (one thread runs the whole "
                                    "inference; time the OS gave other processes is left out)"
                                    if measured.cpu_clock else "each run timed by the wall clock")
                                 + (f"; {measured.caveat()}" if measured.caveat() else "")),
            ] + _prefill_items(history, best, batch)
    else:
        items.append(("best trial", "no configuration meets the criterion"))
    return items


def _prefill_items(history: History, best: TrialRecord, batch: int | str) -> list[tuple[str, str]]:
    """A decode job's other figure: the prompt's time (spec.benchmark.decode), from the same measurement."""
    measured = speed_of(history, best, "prefill") if str(batch) == DECODE_KEY else None
    if measured is None:
        return []
    return [(f"speed at {speed_key_text('prefill')}",
             f"fp32 {measured.fp32_p50_ms:.3f} ms → {measured.p50_ms:.3f} ms: {speed_sentence(measured)}")]


def write_report(folder: Path, job: QuantizationJob, session: TuningSession) -> None:
    history = session.history
    batch = session.batch_size
    best = session.best()
    front = session_front(session)
    has_plot = _plot(folder / PLOT_FILE, history, session, best, batch, front)
    summary = summary_items(job, session)
    notes = session.space.notes if session.space is not None else {}

    md = [f"# qtune report: {job.name}", ""]
    md += [f"- **{k}**: {v}" for k, v in summary]
    if has_plot:
        md += ["", f"![accuracy against latency]({PLOT_FILE})"]
    if front:
        md += ["", "## Accuracy–speed front", "", front_intro(front, batch, best), "",
               "| " + " | ".join(FRONT_HEADERS) + " |", "|" + "---|" * len(FRONT_HEADERS)]
        md += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in front_rows(front)]
    md += ["", "## Trials", "", BOUND_LEGEND, "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
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
    front_html = ""
    if front:
        front_head = "".join(f"<th>{html.escape(h)}</th>" for h in FRONT_HEADERS)
        front_body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                             for row in front_rows(front))
        front_html = (f"<h2>Accuracy–speed front</h2><p>{html.escape(front_intro(front, batch, best))}</p>"
                      f"<table><tr>{front_head}</tr>{front_body}</table>")
    note_items = "".join(f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>" for k, v in notes.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>qtune report: {html.escape(job.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:3px 8px;text-align:left;font-size:13px}}</style></head><body>
<h1>qtune report: {html.escape(job.name)}</h1><table>{items}</table>{image}
{front_html}
<h2>Trials</h2><p>{html.escape(BOUND_LEGEND)}</p><table><tr>{head}</tr>{body}</table>
{f"<h2>Notes from the adaptor</h2><ul>{note_items}</ul>" if notes else ""}</body></html>
"""
    (folder / "report.html").write_text(page)
