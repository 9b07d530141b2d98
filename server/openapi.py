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


def _bound_items(prop: dict[str, Any], minimum: int, maximum: int) -> None:
    """Give integer items (of an array, or of an array among a property's alternatives) their range."""
    for alt in [prop, *prop.get("anyOf", [])]:
        items = alt.get("items") if alt.get("type") == "array" else None
        if isinstance(items, dict) and items.get("type") == "integer":
            items.update(minimum=minimum, maximum=maximum)


_COUNTS = {("VectorBuildRequest", "examples"): "build_max_examples",
           ("VectorSweepRequest", "examples"): "build_max_examples", ("SteerEvaluation", "prompts"): "eval_max_prompts"}
"""List fields whose length a setting bounds."""


def _model_bounds(doc: dict[str, Any], services: Any, settings: Any) -> None:
    """What only the loaded model and the settings decide, written into the request schemas: the model's name,
    the valid token ids, layer indices and positions, and the most examples or prompts one request may send."""
    info, name = services.models.info, services.models.name
    for title, schema in doc.get("components", {}).get("schemas", {}).items():
        props = schema.get("properties", {})
        for (owner, key), setting in _COUNTS.items():
            if title == owner and key in props:
                props[key]["maxItems"] = getattr(settings, setting)
        model = props.get("model")
        if model is not None:
            for alt in [model, *model.get("anyOf", [])]:
                if alt.get("type") == "string":
                    alt["enum"] = [name]
        for key in ("prompt", "tokens", "stop_token_ids"):
            if key in props:
                _bound_items(props[key], 0, info.vocab_size - 1)
        if "layers" in props:
            _bound_items(props["layers"], 0, info.num_layers - 1)
        for alt in [props.get("values") or {}, *(props.get("values") or {}).get("anyOf", [])]:
            if "propertyNames" in alt:  # {layer: [floats]}: the layers this model has
                alt["propertyNames"] = {"enum": [str(i) for i in range(info.num_layers)]}
        if "positions" in props:
            _bound_items(props["positions"], 0, info.max_model_len - 1)


def install_openapi(app: FastAPI) -> None:
    def schema() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                          description="Inference-time steering: OpenAI-compatible generation with per-request "
                                      "steering vectors, attribution, vector building, evaluation.")
        for ops in doc.get("paths", {}).values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)  # validation errors answer 400 with the envelope
        for name in ("HTTPValidationError", "ValidationError"):
            doc.get("components", {}).get("schemas", {}).pop(name, None)
        services = app.state.steerserve.services
        if services is None:
            return doc  # the model has not loaded: not cached, so its bounds appear once it has
        _model_bounds(doc, services, app.state.steerserve.settings)
        app.openapi_schema = doc
        return doc

    app.openapi = schema  # type: ignore[method-assign]


def _flat_routes(routes: list[Any]) -> list[Any]:
    """The routes, with included routers opened up (FastAPI includes them lazily)."""
    out: list[Any] = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None and getattr(route.include_context, "prefix", "") == "":
            out += _flat_routes(list(inner.routes))
        else:
            out.append(route)
    return out


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
        routes = [r for r in _flat_routes(self.router_app.router.routes)
                  if any(r.matches({**scope, "method": m})[0] == Match.FULL for m in self.METHODS)]
        exact = [r for r in routes if getattr(r, "path", None) == scope["path"]]
        routes = exact or routes  # /vectors/build is its own resource, not a vector named "build"
        allowed = [m for m in self.METHODS if any(r.matches({**scope, "method": m})[0] == Match.FULL for r in routes)]
        if not allowed:
            await self.app(scope, receive, send)  # an unknown path: the app's own 404
            return
        response = Response(status_code=204, headers={"Allow": ", ".join([*allowed, "OPTIONS"])})
        await response(scope, receive, send)
