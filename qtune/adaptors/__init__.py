"""Framework adaptors: the Adaptor contract, its registry, and the built-in adaptors (lazy)."""

from qtune.adaptors.base import ADAPTORS, Adaptor, LatencyStats, adaptor_registry, get_adaptor_class

__all__ = ["ADAPTORS", "Adaptor", "LatencyStats", "adaptor_registry", "get_adaptor_class"]
