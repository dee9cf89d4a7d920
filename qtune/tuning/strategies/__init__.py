"""Built-in strategies; importing this package registers them."""

from qtune.tuning.strategies.base import STRATEGIES, Strategy, create_strategy, strategy_registry
from qtune.tuning.strategies.basic import BasicStrategy
from qtune.tuning.strategies.exhaustive import ExhaustiveStrategy
from qtune.tuning.strategies.mixed_bits import MixedBitsStrategy
from qtune.tuning.strategies.random import RandomStrategy

__all__ = [
    "STRATEGIES",
    "BasicStrategy",
    "ExhaustiveStrategy",
    "MixedBitsStrategy",
    "RandomStrategy",
    "Strategy",
    "create_strategy",
    "strategy_registry",
]
