"""An OpenAPI document that says what the server does: the error statuses it really answers, each with the error
envelope's schema, and no 422 (validation errors are 400 here); and ``OPTIONS`` answered with the methods a path
really has."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.routing import Match

from server.protocol.common import ErrorResponse

DESCRIPTIONS = {
    400: "Invalid request (the error names the field)",
    401: "Missing or invalid API key",
    403: "The key's role does not allow this",
    404: "Not found (model, vector or job)",
    408: "The request body did not arrive in time",
    409: "Already exists (set overwrite to replace it)",
    413: "Request body too large",
    500: "The request failed inside the engine",
    501: "This server's backend cannot do this",
    503: "Loading, shutting down, or no room now (see Retry-After)",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for these statuses, each with the error envelope."""
    return {code: {"model": ErrorResponse, "description": DESCRIPTIONS[code]} for code in codes}


API_ERRORS = errors(400, 401, 403, 408, 413, 503)
"""What every API route can answer: a bad request or body, no key, the wrong role, a server not ready."""


def install_openapi(app: FastAPI) -> None:
    def schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                              description="Inference-time steering: OpenAI-compatible generation with per-request "
                                          "steering vectors, attribution, vector building, evaluation.")
            for ops in doc.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)  # validation errors answer 400 with the envelope
            for name in ("HTTPValidationError", "ValidationError"):
                doc.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = schema  # type: ignore[method-assign]


class AllowMethods:
    """ASGI middleware: ``OPTIONS`` on a known path answers 204 with ``Allow`` listing its methods."""

    METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")

    def __init__(self, app: Any, router_app: FastAPI) -> None:
        self.app = app
        self.router_app = router_app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "OPTIONS":
            await self.app(scope, receive, send)
            return
        allowed = [m for m in self.METHODS if any(
            route.matches({**scope, "method": m})[0] == Match.FULL for route in self.router_app.router.routes)]
        if not allowed:
            await self.app(scope, receive, send)  # an unknown path: the app's own 404
            return
        response = Response(status_code=204, headers={"Allow": ", ".join([*allowed, "OPTIONS"])})
        await response(scope, receive, send)
