"""The end-of-run report: Markdown and HTML, with a plot of accuracy against latency."""

from qtune.report.report import write_report

__all__ = ["write_report"]
