"""Importing a job's allowed `module:Class` strategy module without blocking the operator.

The session runs in the operator, so a job's own strategy class is imported there (only from modules
the operator's configuration allows; see reconcile.check_operator_imports). An import whose module
code hangs (a network call at import time, a deadlock) would block the event loop and with it every
job. So the first import of such a module runs in a daemon thread, awaited with a timeout: on
timeout the job ends InvalidSpec naming the module and the limit, and the others go on. Once the
module is imported, building the session imports nothing new.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import logging
import sys
import threading

from qtune.operator.config import module_allowed
from qtune.spec.errors import SpecError

logger = logging.getLogger(__name__)

_imports: dict[str, concurrent.futures.Future[None]] = {}
"""module -> its import running (or done) in a thread; a hung one is never started twice."""


def strategy_module(strategy: str) -> str | None:
    """The module of a `module:Class` strategy, None for a built-in name."""
    module, sep, _ = strategy.partition(":")
    return module.strip() if sep and module.strip() else None


def _imported(module: str) -> bool:
    loaded = sys.modules.get(module)
    spec = getattr(loaded, "__spec__", None)
    return loaded is not None and not getattr(spec, "_initializing", False)


def _start(module: str) -> concurrent.futures.Future[None]:
    future: concurrent.futures.Future[None] = concurrent.futures.Future()

    def work() -> None:
        try:
            importlib.import_module(module)
        except BaseException:  # noqa: BLE001, S110 - even SystemExit: building the session reports it, named
            logger.debug("importing %s failed", module, exc_info=True)
        future.set_result(None)

    threading.Thread(target=work, name=f"qtune import {module}", daemon=True).start()
    return future


async def import_strategy_module(strategy: str, field: str, timeout: float, allowed: tuple[str, ...]) -> None:
    """Import the strategy's module (if any, and only an allowed one) in a thread, waiting at most `timeout`
    seconds; raises SpecError on `field` when the import takes longer. Import errors, and modules that are
    not allowed, are left for the session's builder to report (it imports nothing then)."""
    module = strategy_module(strategy)
    if module is None or not module_allowed(module, allowed) or _imported(module):
        return
    future = _imports.get(module)
    if future is None or future.done():  # done but not imported: it failed; try once more
        future = _imports[module] = _start(module)
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout)
    except TimeoutError:
        logger.warning("importing %s took longer than %gs; jobs using it fail", module, timeout)
        raise SpecError(field, f"cannot use {strategy}: importing module {module!r} did not finish within "
                               f"{timeout:g}s (operator setting QTUNE_IMPORT_TIMEOUT / --import-timeout); its "
                               "import hangs or is too slow for the operator") from None
