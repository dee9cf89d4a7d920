"""qtune/operator/handlers.py `_no_finalizer_for` reaches into Kopf's private `registry._spawning`, so Kopf is
pinned (pyproject.toml, `operator` extra). These tests fail with a clear message when an upgrade changes
the shape that code relies on; re-check `_no_finalizer_for` before moving the pin."""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from importlib import metadata
from pathlib import Path

import kopf
import pytest
from kopf._core.intents import causes

from qtune.operator import constants as c
from qtune.operator import handlers

ROOT = Path(__file__).resolve().parents[2]
UPGRADE = ("Kopf changed: qtune/operator/handlers.py `_no_finalizer_for` uses the private registry._spawning "
           "and the handlers' `requires_finalizer`; adapt it, then move the pin in pyproject.toml")


def _pinned_kopf() -> str:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["operator"]
    pins = [req.split("==", 1)[1] for req in extra if req.replace(" ", "").startswith("kopf==")]
    assert len(pins) == 1, f"pyproject.toml's operator extra must pin kopf exactly (kopf==X.Y.Z), has {extra}"
    return pins[0].strip()


def test_the_installed_kopf_is_the_pinned_one() -> None:
    installed, pinned = metadata.version("kopf"), _pinned_kopf()
    assert installed == pinned, f"kopf {installed} installed, pyproject.toml pins {pinned}: {UPGRADE}"


def _spawning_cause() -> causes.SpawningCause:
    body = kopf.Body({"apiVersion": f"{c.GROUP}/{c.VERSION}", "kind": "QuantizationJob",
                      "metadata": {"name": "digits", "namespace": "ml", "uid": "u-1"}})
    return causes.SpawningCause(logger=logging.getLogger(__name__), indices={}, memo=kopf.Memo(),
                                resource=kopf.Resource(c.GROUP, c.VERSION, c.PLURAL), patch=kopf.Patch(),
                                body=body, reset=False)


def test_no_finalizer_for_still_drops_the_daemons_finalizer(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = kopf.OperatorRegistry()

    @kopf.daemon(c.GROUP, c.VERSION, c.PLURAL, id="probe", registry=registry)
    async def probe(**_: object) -> None:  # pragma: no cover - never run
        return None

    spawning = getattr(registry, "_spawning", None)
    assert spawning is not None and callable(getattr(spawning, "get_all_handlers", None)), UPGRADE
    assert callable(getattr(spawning, "requires_finalizer", None)), UPGRADE
    (handler,) = [h for h in spawning.get_all_handlers() if h.id == "probe"]
    assert dataclasses.is_dataclass(handler), UPGRADE
    assert "requires_finalizer" in {f.name for f in dataclasses.fields(handler)}, UPGRADE
    cause = _spawning_cause()
    assert spawning.requires_finalizer(cause=cause), f"a daemon no longer asks for a finalizer: {UPGRADE}"

    monkeypatch.setattr(kopf, "get_default_registry", lambda: registry)
    handlers._no_finalizer_for("probe")
    assert not spawning.requires_finalizer(cause=cause), f"the job daemon would still get a finalizer: {UPGRADE}"


def test_the_job_daemon_runs_without_a_finalizer() -> None:
    found = [h for h in kopf.get_default_registry()._spawning.get_all_handlers() if h.id == "tune"]
    assert len(found) == 1 and found[0].requires_finalizer is False, UPGRADE
