"""`qtune status --cluster` prints a job at every phase (it crashed before the first trial)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from test_reconcile import World

from qtune.cli.cluster_status import print_status


def _text(status: dict) -> str:
    out = io.StringIO()
    assert print_status("ml", "digits", status, Console(file=out, width=200)) == 0
    return out.getvalue()


@pytest.mark.parametrize("phase", ["created", "baseline", "first trial", "tuning", "done", "invalid"])
def test_status_at_every_phase(phase: str) -> None:
    world = World()
    if phase == "invalid":
        world.body["spec"]["tuning"]["strategy"] = "nope"
    steps = {"created": 0, "baseline": 1, "first trial": 2, "tuning": 4, "done": 200, "invalid": 1}[phase]
    for _ in range(steps):
        if world.step().done:
            break
        world.finish_running()
    text = _text(dict(world.kube.status))
    assert "ml/digits" in text
    expected = {"created": "Pending", "baseline": "Baseline", "first trial": "Running", "tuning": "Running",
                "done": "Succeeded", "invalid": "InvalidSpec"}[phase]
    assert expected in text
    if phase == "done":
        assert "best: trial" in text and "speedup" in text
        # the accuracy-speed front, from status.front: the winner among its rows
        front = world.kube.status["front"]
        assert front["entries"] and "accuracy–speed front" in text and "chosen" in text
        winner = next(e for e in front["entries"] if e["winner"])
        assert winner["trial"] == world.kube.status["best"]["trial"]
        assert f"{winner['speedup']:.2f}× [{winner['low']:.2f}–{winner['high']:.2f}]" in text


def test_job_text_prints_as_itself() -> None:
    """Status text comes from a tenant (names, messages, user errors): a stray Rich tag must not crash the
    print, and escape sequences (colours, OSC-8 links, cursor moves) must not reach the terminal."""
    hostile = "[/bold] broke \x1b]8;;http://example.invalid\x1b\\link\x1b]8;;\x1b\\ \x1b[2J[red]x[/red]\x9b"
    status = {"state": "Failed", "reason": "[bold]", "message": hostile,
              "conditions": [{"type": "Ready", "status": "False", "reason": "[link]", "message": hostile}],
              "recentTrials": [{"index": 0, "status": "failed", "reason": hostile}]}
    text = _text(status)
    assert "[/bold] broke" in text and "[red]x[/red]" in text and "([bold])" in text
    assert not any(ch in text for ch in ("\x1b", "\x9b", "\x07"))
