"""Exceptions raised by the core. Each carries the request field it concerns, when there is one."""

from __future__ import annotations


class EngineError(Exception):
    """Base class for errors raised by steerserve's core."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ModelLoadError(EngineError):
    """The model could not be loaded, or its decoder layers could not be found."""


class SteeringValidationError(EngineError, ValueError):
    """A steering spec does not fit the loaded model (wrong hidden size, unknown layer, NaN/Inf...)."""


class RequestValidationError(EngineError, ValueError):
    """A generation request is invalid (prompt too long, bad sampling parameters...)."""


class QueueFullError(EngineError):
    """The engine's waiting queue is full; try again later (the server answers 503)."""


class EngineClosedError(EngineError):
    """The engine has been shut down or its inference thread died."""


class RequestFailedError(EngineError):
    """The request failed inside the engine; other requests are unaffected."""
