"""Pure ASGI middleware (no ``BaseHTTPMiddleware``: server-sent events stream through untouched).

:class:`BodyLimits`: a size limit (413) and a time limit (408) on receiving request bodies. A body is read in full
before the app sees it (it is at most ``max_bytes``), so an oversized body, with a Content-Length or chunked, is
answered 413 by this middleware itself, and a client sending its body too slowly (a byte a second) is answered 408
instead of holding its connection open.

:class:`HTTPMetrics`: every HTTP request counted by method, route template (``/v1/steering/vectors/{name}``, never
the raw path; ``unmatched`` when no route matches) and status, with its latency until the response's last byte.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.routing import BaseRoute, Match, Mount

from server.errors import ErrorJSON, count_refusal, error_body, metrics_of
from server.metrics import UNMATCHED_ROUTE


class BodyLimits:
    def __init__(self, app: Any, max_bytes: int, timeout: float) -> None:
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(scope, send, 413, f"request body larger than {self.max_bytes} bytes")
            return
        if length is None and b"chunked" not in headers.get(b"transfer-encoding", b""):
            await self.app(scope, receive, send)  # no body
            return
        messages, size = [], 0
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":  # the client went away
                        messages.append(message)
                        break
                    size += len(message.get("body", b""))
                    if size > self.max_bytes:
                        await self._reject(scope, send, 413, f"request body larger than {self.max_bytes} bytes")
                        return
                    messages.append(message)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await self._reject(scope, send, 408, f"the request body did not arrive within {self.timeout:g} s")
            return

        async def replay() -> Any:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _reject(scope: Any, send: Any, status: int, message: str) -> None:
        count_refusal(scope.get("app"), status)
        resp = ErrorJSON(error_body(status, message), status_code=status, headers={"Connection": "close"})
        await send({"type": "http.response.start", "status": status, "headers": resp.raw_headers})
        await send({"type": "http.response.body", "body": resp.body})


def route_template(routes: list[BaseRoute], scope: Any) -> str:
    """The template of the route a request matched (``scope["route"]``, set by the router), or of the first route
    its path matches (a request answered before routing: 413, ``OPTIONS``, 405), else ``unmatched``."""
    route = scope.get("route")
    if route is None:
        partial = None
        for candidate in routes:
            match, _ = candidate.matches(scope)
            if match == Match.FULL:
                route = candidate
                break
            if match == Match.PARTIAL and partial is None:
                partial = candidate
        route = route or partial
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return UNMATCHED_ROUTE
    return path + "/{path}" if isinstance(route, Mount) else path


class HTTPMetrics:
    """Count every HTTP request in the app's metrics (once its services exist), streaming untouched: ``send`` is
    only watched for the status, and the latency runs until the response's last byte."""

    def __init__(self, app: Any, router_app: Any) -> None:
        self.app = app
        self.router_app = router_app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # an exception before the response started is answered 500 by the outermost middleware

        async def watch(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            metrics = metrics_of(self.router_app)
            if metrics is not None:
                route = route_template(self.router_app.router.routes, scope)
                metrics.http_request(scope["method"], route, status, time.perf_counter() - start)
