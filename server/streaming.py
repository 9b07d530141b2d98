"""Streaming over HTTP: server-sent events (one JSON payload per ``data:`` line; an error event then ``[DONE]``
when a stream fails after it started, since its status line has already gone out), and cancelling a whole
response's work when its client disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from server.errors import as_api_error, error_body
from steering.errors import SteeringError

T = TypeVar("T")


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


DONE = sse("[DONE]")


def error_event(error: SteeringError) -> str:
    """A core error as the last event of a stream that already started (with its HTTP status as the code)."""
    api = as_api_error(error)
    return sse(error_body(api.status, api.message, api.param, api.type))


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | Response:
    """Await a whole (non-streaming) response's work; if the client disconnects first, cancel it."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return Response(status_code=499)
