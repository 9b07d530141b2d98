"""Errors as HTTP: one table maps each kind of core error to a status and an OpenAI error type, and every error
leaves the server in the OpenAI envelope ``{"error": {"message", "type", "param", "code"}}``.

Services raise core errors (:mod:`steering.errors`); only concerns that exist in HTTP alone (authentication,
body size, a model still loading) raise :class:`APIError` with a status of their own.

Every refused request is counted here, once, as its error response is made (:func:`count_refusal`, also called by
:class:`server.middleware.BodyLimits` for the responses it makes itself): the ``reason`` label comes from the
error's kind and status (:func:`failure_reason`), never from the request. A generation that fails inside the engine
is counted by its outcome (``engine_error``) instead, so its 500 is not counted again.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.metrics import Metrics
from steering.errors import (
    ConflictError,
    EngineClosedError,
    InvalidRequestError,
    JobCancelledError,
    ModelLoadError,
    NotFoundError,
    QueueFullError,
    RequestFailedError,
    SteeringError,
    UnsupportedError,
)

log = logging.getLogger(__name__)

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error", 409: "conflict_error",
         413: "invalid_request_error",
         429: "rate_limit_error", 501: "not_implemented_error", 503: "service_unavailable_error"}

ERROR_TABLE: tuple[tuple[type[SteeringError], int], ...] = (
    (QueueFullError, 503),  # with Retry-After: retrying can succeed
    (EngineClosedError, 503),
    (ModelLoadError, 503),
    (NotFoundError, 404),
    (ConflictError, 409),
    (JobCancelledError, 409),
    (UnsupportedError, 501),
    (InvalidRequestError, 400),
    (RequestFailedError, 500),
    (SteeringError, 500),
)
"""Core error kind -> HTTP status, most specific first."""


class APIError(Exception):
    """An error that exists only in HTTP (authentication, body size, not ready), with its own status."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type_ or TYPES.get(status, "server_error")
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, type_: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_ or TYPES.get(status, "server_error"), "param": param,
                      "code": status}}


class ErrorJSON(JSONResponse):
    """The envelope as ASCII JSON: whatever text an error quotes, the response can always be written."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, param: str | None = None, type_: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return ErrorJSON(error_body(status, message, param, type_), status_code=status, headers=headers)


STATUS_REASONS = {400: "invalid_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
                  405: "method_not_allowed", 408: "body_timeout", 409: "conflict", 413: "too_large",
                  422: "invalid_request", 429: "rate_limited", 501: "unsupported", 503: "unavailable"}
"""HTTP status -> the ``reason`` label of ``steerserve_request_failure_total`` (all in
:data:`server.metrics.FAILURE_REASONS`)."""


def failure_reason(status: int, exc: BaseException | None = None) -> str | None:
    """The bounded failure label of an error response, or None when it is counted elsewhere (a core error answered
    500: the engine's failure, counted by the request's outcome)."""
    if isinstance(exc, QueueFullError):
        return "queue_full"
    if isinstance(exc, SteeringError) and status == 500:
        return None
    if status in STATUS_REASONS:
        return STATUS_REASONS[status]
    if status == 500:
        return "internal_error"
    return "client_error" if status < 500 else "server_error"


def metrics_of(app: Any) -> Metrics | None:
    """The app's metrics once its services exist (not while the model loads)."""
    services = getattr(getattr(getattr(app, "state", None), "steerserve", None), "services", None)
    metrics = getattr(services, "metrics", None)
    return metrics if isinstance(metrics, Metrics) else None


def count_refusal(app: Any, status: int, exc: BaseException | None = None) -> None:
    """Count one refused request of ``app`` in ``steerserve_request_failure_total``."""
    reason = failure_reason(status, exc)
    metrics = metrics_of(app)
    if reason is not None and metrics is not None:
        metrics.refused(reason)


def as_api_error(exc: SteeringError, retry_after: int = 1) -> APIError:
    """A core error as HTTP, through :data:`ERROR_TABLE`."""
    status = next(code for kind, code in ERROR_TABLE if isinstance(exc, kind))
    headers = {"Retry-After": str(retry_after)} if isinstance(exc, QueueFullError) else None
    return APIError(status, exc.message, exc.param, headers=headers)


_UNION_TAG = re.compile(r"^(str|int|float|bool|dict|list|none|constrained-\w+|function-\w+.*|literal\[.*\]|\w+\[.*\])$")
"""The names pydantic gives union members in an error's location (``prompt.list[int]``): not fields."""


def _loc(loc: Any, body: Any = None) -> str | None:
    loc = list(loc)
    if len(loc) > 1 and loc[0] == "body" and isinstance(body, dict) and loc[1] == body.get("type"):
        del loc[1]  # the tag of a tagged union (``"type": "steer"``) is not a field
    parts = [str(p) for p in loc if p not in ("body", "query", "path")
             and not (isinstance(p, str) and _UNION_TAG.match(p))]
    return ".".join(parts) or None


def validation_message(errors: list[Any], body: Any = None) -> tuple[str, str | None]:
    """One message for pydantic validation errors (the first few), and the first one's field."""
    first = errors[0] if errors else {}
    parts = []
    for err in errors[:5]:
        where = _loc(err.get("loc", ()), body)
        msg = "unknown field (not part of this API)" if err.get("type") == "extra_forbidden" else err.get("msg")
        parts.append(f"{where}: {msg}" if where else str(msg))
    return "; ".join(parts), _loc(first.get("loc", ()), body)


def install_error_handlers(app: FastAPI, retry_after: int = 1) -> None:
    """The handlers that turn every error into the envelope; each counts its refusal once."""

    def respond(request: Request, exc: BaseException, status: int, message: str, param: str | None = None,
                type_: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
        count_refusal(request.app, status, exc)
        return error_response(status, message, param, type_, headers)

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        return respond(request, exc, exc.status, exc.message, exc.param, exc.type, exc.headers)

    @app.exception_handler(SteeringError)
    async def _core(request: Request, exc: SteeringError) -> JSONResponse:
        api = as_api_error(exc, retry_after)
        return respond(request, exc, api.status, api.message, api.param, api.type, api.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return respond(request, exc, 400,
                           f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        message, param = validation_message(errors, exc.body)
        return respond(request, exc, 400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return respond(request, exc, exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(json.JSONDecodeError)
    async def _json(request: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return respond(request, exc, 400, f"request body is not valid JSON: {exc}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return respond(request, exc, 500, f"internal error: {type(exc).__name__}", type_="server_error")
