"""Errors as HTTP: one table maps each kind of core error to a status and an OpenAI error type, and every error
leaves the server in the OpenAI envelope ``{"error": {"message", "type", "param", "code"}}``.

Services raise core errors (:mod:`steering.errors`); only concerns that exist in HTTP alone (authentication,
body size, a model still loading) raise :class:`APIError` with a status of their own.
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
    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.type, exc.headers)

    @app.exception_handler(SteeringError)
    async def _core(_: Request, exc: SteeringError) -> JSONResponse:
        api = as_api_error(exc, retry_after)
        return error_response(api.status, api.message, api.param, api.type, api.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        message, param = validation_message(errors, exc.body)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(json.JSONDecodeError)
    async def _json(_: Request, exc: json.JSONDecodeError) -> JSONResponse:
        return error_response(400, f"request body is not valid JSON: {exc}")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}", type_="server_error")
