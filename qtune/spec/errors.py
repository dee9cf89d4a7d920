"""Errors a person can act on: each names the field and what is allowed."""

from __future__ import annotations


class QtuneError(Exception):
    """Base of every error qtune reports to a user as one line."""


class SpecError(QtuneError):
    """The job document is invalid. `field` is the dotted camelCase path (e.g. spec.tuning.maxTrials)."""

    def __init__(self, field: str, message: str, source: str | None = None) -> None:
        self.field = field
        self.message = message
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {message}" if field else f"{where}{message}")


class ModelLoadError(QtuneError):
    """The model file is missing, corrupt, or not what the framework expects."""


class DataError(QtuneError):
    """A data set is missing, corrupt, or does not match the model's inputs."""
