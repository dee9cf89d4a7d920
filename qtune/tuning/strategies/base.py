"""Strategy interface: a pure function of (space, history).

`propose(space, history, k)` returns at most k new tune configs (none already in the history).
Returning fewer, or none, while trials are pending means "wait for results"; returning none with
no pending trials means the strategy has nothing left (`goal_reached` tells whether it found
what it was looking for). Everything a strategy knows is in the space and the history, so a run
resumes from its history and the operator can restart at any time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

from qtune.spec.errors import SpecError
from qtune.tuning.config import TuneConfig
from qtune.tuning.criterion import Criterion
from qtune.tuning.history import History
from qtune.tuning.space import TuningSpace

STRATEGIES: dict[str, type[Strategy]] = {}


def strategy_registry(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls
    return cls


class Strategy(ABC):
    name: str = ""
    criterion: Criterion | None = None
    """The job's accuracy criterion, set by the session after construction (a strategy of your own keeps
    its constructor): how far a failed config missed is then known (see outlook.py)."""

    def __init__(self, seed: int = 0, objective: str = "latency", min_speedup: float = 1.0,
                 batch_size: int | None = None, criterion: Criterion | None = None) -> None:
        self.criterion = criterion
        self.seed = seed
        self.objective = objective
        self.min_speedup = min_speedup
        """A passing config is a success only when faster than this beyond doubt (objective latency)."""
        self.batch_size = batch_size
        """The batch size whose speed decides (the largest benchmarked)."""

    @abstractmethod
    def propose(self, space: TuningSpace, history: History, k: int) -> list[TuneConfig]: ...

    def needs_full_evaluation(self, space: TuningSpace, history: History, config: TuneConfig) -> bool:
        """True when this config's exact score matters even if it fails the criterion (e.g. the strategy
        ranks failing configs by accuracy); else the trial may stop evaluating once it cannot pass."""
        return False

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


STRATEGY_FIELD = "spec.tuning.strategy"


def create_strategy(name: str, seed: int = 0, **options: Any) -> Strategy:
    """A registered strategy, or `module:Class` naming a Strategy subclass; `options` (objective,
    min_speedup, batch_size) go to its constructor. A bad name raises SpecError on the field."""
    from qtune.tuning import strategies  # noqa: F401  (registers the built-ins)

    field = "spec.tuning.strategy"
    if name in STRATEGIES:
        return STRATEGIES[name](seed, **options)
    if ":" in name:
        from qtune.spec.entrypoints import load_entrypoint

        allowed = f"{', '.join(sorted(STRATEGIES))} or module:Class of a qtune Strategy subclass"
        cls = load_entrypoint(name, field, None, kind="class", allowed=allowed)
        if not issubclass(cls, Strategy):
            raise SpecError(field, f"{name} is not a qtune Strategy subclass; allowed: {allowed}")
        return cls(seed, **options)
    raise SpecError(field, f"unknown strategy {name!r}; allowed: {', '.join(sorted(STRATEGIES))} or module:Class")
