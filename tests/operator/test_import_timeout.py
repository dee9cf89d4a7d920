"""An allowed `module:Class` strategy module whose import hangs ends its job InvalidSpec after the
operator's import timeout, and never blocks the event loop (other jobs step meanwhile)."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from opfakes import job_body, make_config
from test_reconcile import World, spec_dict

from qtune.operator import status as st
from qtune.operator.config import OperatorConfig


def _config(**overrides: Any) -> OperatorConfig:
    return OperatorConfig(**{**make_config().__dict__, **overrides})


def _sleeping_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seconds: float) -> str:
    name = f"qtune_slow_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        f"import time\ntime.sleep({seconds})\n"
        "from qtune.tuning.strategies.base import STRATEGIES\nSearch = STRATEGIES['basic']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_a_hanging_import_fails_the_job_without_blocking_other_jobs(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    name = _sleeping_module(tmp_path, monkeypatch, 4.0)
    config = _config(allowed_modules=(name,), import_timeout=0.5)
    hung = World(job_body(spec=spec_dict(strategy=f"{name}:Search")), config=config)
    other = World()
    finished: dict[str, float] = {}

    async def both() -> Any:
        start = time.monotonic()

        async def timed(label: str, world: World) -> Any:
            result = await world.reconciler.step(world.body, world.pods())
            finished[label] = time.monotonic() - start
            return result

        return await asyncio.gather(timed("hung", hung), timed("other", other))

    hung_result, other_result = asyncio.run(both())
    assert other_result.state == st.BASELINE and finished["other"] < 0.5  # not held up by the import
    assert hung_result.done and hung.kube.status["state"] == st.FAILED_STATE
    assert 0.5 <= finished["hung"] < 3.0
    assert hung.kube.status["reason"] == st.INVALID_SPEC
    message = hung.kube.status["message"]
    assert message.startswith("spec.tuning.strategy:") and repr(name) in message and "0.5s" in message
    assert "QTUNE_IMPORT_TIMEOUT" in message
    assert not hung.kube.created_pods


def test_a_slow_import_within_the_timeout_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = _sleeping_module(tmp_path, monkeypatch, 0.3)
    world = World(job_body(spec=spec_dict(strategy=f"{name}:Search")), config=_config(allowed_modules=(name,),
                                                                                        import_timeout=5.0))
    assert world.step().state == st.BASELINE


def test_the_import_timeout_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert OperatorConfig().import_timeout == 30.0
    monkeypatch.setenv("QTUNE_IMPORT_TIMEOUT", "7.5")
    assert OperatorConfig.from_env().import_timeout == 7.5
    with pytest.raises(ValueError, match="import_timeout"):
        OperatorConfig(import_timeout=0)
