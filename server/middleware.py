"""ASGI middleware for request bodies: a size limit (413) and a time limit (408) on receiving them.

A body is read in full before the app sees it (it is at most ``max_bytes``), so an oversized body, with a
Content-Length or chunked, is answered 413 by this middleware itself, and a client sending its body too slowly
(a byte a second) is answered 408 instead of holding its connection open.
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.errors import ErrorJSON, error_body


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
            await self._reject(send, 413, f"request body larger than {self.max_bytes} bytes")
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
                        await self._reject(send, 413, f"request body larger than {self.max_bytes} bytes")
                        return
                    messages.append(message)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            await self._reject(send, 408, f"the request body did not arrive within {self.timeout:g} s")
            return

        async def replay() -> Any:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _reject(send: Any, status: int, message: str) -> None:
        resp = ErrorJSON(error_body(status, message), status_code=status, headers={"Connection": "close"})
        await send({"type": "http.response.start", "status": status, "headers": resp.raw_headers})
        await send({"type": "http.response.body", "body": resp.body})
