"""Strategy interface: a pure function of (space, history).

`propose(space, history, k)` returns at most k new tune configs (none already in the history).
Returning fewer, or none, while trials are pending means "wait for results"; returning none with
no pending trials means the strategy has nothing left (`goal_reached` tells whether it found
what it was looking for). Everything a strategy knows is in the space and the history, so a run
resumes from its history and the operator can restart at any time.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterable

from qtune.tuning.config import TuneConfig
from qtune.tuning.history import History
from qtune.tuning.space import TuningSpace

STRATEGIES: dict[str, type[Strategy]] = {}


def strategy_registry(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls
    return cls


class Strategy(ABC):
    name: str = ""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @abstractmethod
    def propose(self, space: TuningSpace, history: History, k: int) -> list[TuneConfig]: ...

    def goal_reached(self, space: TuningSpace, history: History) -> bool:
        """True when the strategy's search is complete and further trials are pointless."""
        return False


def fresh(configs: Iterable[TuneConfig], history: History, k: int) -> list[TuneConfig]:
    """The first k configs that are neither in the history nor repeated (reads `configs` lazily)."""
    seen = history.keys()
    out: list[TuneConfig] = []
    for config in configs:
        key = config.key()
        if key not in seen:
            seen.add(key)
            out.append(config)
        if len(out) >= k:
            break
    return out


def create_strategy(name: str, seed: int) -> Strategy:
    from qtune.tuning import strategies  # noqa: F401  (registers the built-ins)

    if name in STRATEGIES:
        return STRATEGIES[name](seed)
    if ":" in name:
        module_name, class_name = name.split(":", 1)
        cls = getattr(importlib.import_module(module_name), class_name)
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise ValueError(f"{name} is not a qtune Strategy subclass")
        return cls(seed)
    raise ValueError(f"unknown strategy {name!r}; allowed: {', '.join(sorted(STRATEGIES))} or module:Class")
