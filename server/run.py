"""Running the app under uvicorn, with the connection limits and the shutdown a production server needs.

* Connections: a client must finish its request headers within ``header_timeout_seconds`` of connecting (or of
  its previous response); idle keep-alive connections close after ``keep_alive_seconds``; at most
  ``max_connections`` connections and requests are served at once (beyond, uvicorn answers 503). Bodies are
  bounded in size and time by :class:`server.middleware.BodyLimits`.
* With ``stop_on_load_error`` (``steerserve serve``), a model that fails to load stops the server (the lifespan's
  loader reports it through ``AppState.on_load_error``); :attr:`SteerServer.load_error` then holds the reason and
  the command exits non-zero.
* Shutdown: the first SIGTERM (or SIGINT) marks the app draining: ``/ready`` answers 503 and new requests 503,
  while the listener stays open and running work goes on, for at least ``shutdown_delay_seconds`` (so a load
  balancer sees the probe fail) and at most ``drain_seconds``. Streams still running then end with an error
  event and ``[DONE]``, and uvicorn shuts down. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from types import FrameType
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.lifespan import AppState
from server.settings import ServerSettings

log = logging.getLogger(__name__)

SHUTDOWN_MESSAGE = "the server is shutting down"


class HeaderTimeoutProtocol(H11Protocol):
    """h11 with a deadline for each request's headers, counted from the connection (or the previous response):
    uvicorn's own timer is reset by any byte, so a client sending a header a minute would be kept forever."""

    header_timeout: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._deadline)

    def _deadline(self) -> None:
        # h11 leaves the client IDLE until a request's headers are complete.
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class SteerServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, stop_on_load_error: bool = False) -> None:
        super().__init__(config)
        self.state: AppState = app.state.steerserve
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None
        self.load_error: str | None = None
        """Set when the model failed to load and ``stop_on_load_error``: the server has stopped (``steerserve
        serve`` then exits non-zero). Without it, the server stays up and ``/ready`` and ``/health`` report it."""
        if stop_on_load_error:
            self.state.on_load_error = self._load_failed

    def _load_failed(self, message: str) -> None:
        # Called on the event loop by the lifespan's loader: a server that can never become ready stops, so that
        # a supervisor sees the failure (and restarts it, or reports it) instead of a process stuck at /ready 503.
        self.load_error = message
        self.should_exit = True

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is not None or self._loop is None or self.state.services is None:
            super().handle_exit(sig, frame)  # a second signal, or nothing to drain: exit now
            return
        self.state.draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        settings, services = self.state.settings, self.state.services
        assert services is not None
        t0 = time.monotonic()
        log.info("draining: /ready answers 503; waiting up to %g s for running work", settings.drain_seconds)
        idle = await asyncio.to_thread(services.backend.drain, settings.drain_seconds)
        delay = settings.shutdown_delay_seconds - (time.monotonic() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        if not idle:
            log.warning("drain timed out; stopping the generations still running")
            services.submitter.stop_all(SHUTDOWN_MESSAGE)
            await asyncio.to_thread(services.backend.drain, 5.0)
        self.state.drained = True
        self.should_exit = True


def build_server(app: FastAPI, settings: ServerSettings, *, stop_on_load_error: bool = False) -> SteerServer:
    """``stop_on_load_error``: a model that fails to load stops the server (the command line's choice, so that a
    supervisor sees the failure); else it keeps serving 503 with the reason."""
    # The engine's and the preparing threads share the GIL with the event loop; a short switch interval lets the
    # loop forward a token (or answer a probe) at once instead of waiting up to 5 ms per hand-off.
    sys.setswitchinterval(0.0005)
    protocol = type("SteerServeH11", (HeaderTimeoutProtocol,), {"header_timeout": settings.header_timeout_seconds})
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, http=protocol,
        timeout_keep_alive=settings.keep_alive_seconds, limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=max(1, int(settings.drain_seconds) + 5),
    )
    return SteerServer(config, app, stop_on_load_error)
