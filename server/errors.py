"""Errors in the OpenAI envelope ``{"error": {"message", "type", "param", "code"}}``, never a 422 or a bare 500."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from steering.errors import (
    EngineClosedError,
    EngineError,
    ModelLoadError,
    QueueFullError,
    RequestValidationError as CoreValidationError,
    SteeringValidationError,
)
from steering.registry import VectorExistsError, VectorNotFoundError

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
          503: "service_unavailable_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type_ or _TYPES.get(status, "server_error")
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, type_: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_ or _TYPES.get(status, "server_error"), "param": param,
                      "code": status}}


def error_response(status: int, message: str, param: str | None = None, type_: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, type_), status_code=status, headers=headers)


def from_engine_error(exc: EngineError, retry_after: int = 1) -> APIError:
    """Map a core error to its HTTP status."""
    if isinstance(exc, QueueFullError):
        return APIError(503, exc.message, headers={"Retry-After": str(retry_after)})
    if isinstance(exc, VectorNotFoundError):
        return APIError(404, exc.message, exc.param)
    if isinstance(exc, VectorExistsError):
        return APIError(409, exc.message, exc.param)
    if isinstance(exc, (SteeringValidationError, CoreValidationError)):
        return APIError(400, exc.message, exc.param)
    if isinstance(exc, (EngineClosedError, ModelLoadError)):
        return APIError(503, exc.message)
    return APIError(500, exc.message, exc.param, "server_error")


def _loc(loc, body=None) -> str | None:
    loc = list(loc)
    if len(loc) > 1 and loc[0] == "body" and isinstance(body, dict) and loc[1] == body.get("type"):
        del loc[1]  # the tag of a tagged union (``"type": "steer"``) is not a field
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI, retry_after: int = 1) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.type, exc.headers)

    @app.exception_handler(EngineError)
    async def _engine(_: Request, exc: EngineError):
        api = from_engine_error(exc, retry_after)
        return error_response(api.status, api.message, api.param, api.type, api.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        parts = []
        for err in errors[:5]:
            where = _loc(err.get("loc", ()), exc.body)
            msg = "unknown field (not part of this API)" if err.get("type") == "extra_forbidden" else err.get("msg")
            parts.append(f"{where}: {msg}" if where else str(msg))
        return error_response(400, "; ".join(parts), _loc(first.get("loc", ()), exc.body))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(json.JSONDecodeError)
    async def _json(_: Request, exc: json.JSONDecodeError):
        return error_response(400, f"request body is not valid JSON: {exc}")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}", type_="server_error")
