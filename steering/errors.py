"""Exceptions raised by the core. Each carries the request field it concerns, when there is one.

The kinds are what a caller can act on: an invalid request (fix it), something not found or already there,
no room right now (retry later), a capability the backend lacks, or a failure inside the engine. The server
maps each kind to one HTTP status in one table (``server/errors.py``); the core never speaks HTTP.
"""

from __future__ import annotations


class SteeringError(Exception):
    """Base class of every error raised by steerserve's core."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return self.message


class ModelLoadError(SteeringError):
    """The model could not be loaded, or its decoder layers could not be found."""


class InvalidRequestError(SteeringError, ValueError):
    """A request is invalid (prompt too long, bad sampling parameters, unknown method...)."""


class SteeringValidationError(InvalidRequestError):
    """A steering spec does not fit the loaded model (wrong hidden size, unknown layer, NaN/Inf...)."""


class SteeringOverflowError(InvalidRequestError):
    """The request's steering drove its hidden states (or logits) to Inf/NaN; only that request fails."""


class NotFoundError(SteeringError, LookupError):
    """The named thing (vector, job, model) does not exist."""


class ConflictError(SteeringError):
    """The named thing already exists (and replacing it was not asked for)."""


class QueueFullError(SteeringError):
    """No room right now (the waiting queue or the job queue is full); retrying later can succeed."""


class EngineClosedError(SteeringError):
    """The engine has been shut down, is draining, or its inference thread died."""


class UnsupportedError(SteeringError):
    """The backend does not have the capability the request needs (e.g. gradients on a generation-only
    backend)."""


class RequestFailedError(SteeringError):
    """The request failed inside the engine; other requests are unaffected."""


class JobCancelledError(SteeringError):
    """The job was cancelled before it finished."""
