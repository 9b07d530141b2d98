"""The backend's life in the app: built in the background at start-up (``/ready`` answers 503 until it has
loaded), drained and stopped at shutdown. :data:`BACKENDS` maps ``settings.backend`` to its factory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import FastAPI

from server.auth import KeyRing
from server.errors import APIError
from server.serving import Services, build_services
from server.settings import ServerSettings, request_limits
from steering.engine.base import GenerationBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendFactory:
    build: Callable[[ServerSettings], GenerationBackend]
    analysis: bool
    """Whether the backend it builds runs analysis jobs (attribution, vector builds, evaluations)."""


def build_hf(settings: ServerSettings) -> GenerationBackend:
    from steering.backends.hf import EngineConfig, HFEngine, load_model

    lm = load_model(settings.model, device=settings.device, dtype=settings.dtype, cache_dir=settings.cache_dir)
    engine = HFEngine(lm, EngineConfig(max_batch_size=settings.max_batch_size, max_queue_size=settings.max_queue_size,
                                       max_model_len=settings.max_model_len, max_jobs=settings.max_jobs,
                                       job_chunk_tokens=settings.job_chunk_tokens,
                                       background_share=settings.background_share),
                      limits=request_limits(settings))
    log.info("model %s loaded on %s (%s)", lm.name, lm.device, lm.dtype)
    return engine.start()


BACKENDS: dict[str, BackendFactory] = {"hf": BackendFactory(build_hf, analysis=True)}


class AppState:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.keys = KeyRing.load(settings.api_key, settings.api_keys, settings.api_keys_file)
        self.services: Services | None = None
        self.load_error: str | None = None
        self.draining = False
        self.drained = False
        """Set once a signal-driven drain has finished (the lifespan need not wait again)."""

    def require(self) -> Services:
        if self.services is None:
            msg = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise APIError(503, msg, headers={"Retry-After": "5"})
        if self.draining:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"})
        return self.services

    @property
    def ready(self) -> bool:
        return self.services is not None and not self.draining and self.services.backend.alive()


Lifespan = Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]


def lifespan(state: AppState, backend: GenerationBackend | None) -> Lifespan:
    """Start-up and shutdown. A ``backend`` passed in is the caller's: it is drained, not stopped."""
    settings = state.settings

    async def load() -> None:
        try:
            built = await asyncio.to_thread(BACKENDS[settings.backend].build, settings)
            state.services = build_services(settings, built)
        except Exception as exc:  # noqa: BLE001 - reported by /ready and /health
            log.exception("the model failed to load")
            state.load_error = str(exc)

    @contextlib.asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[None]:
        loader = None
        if backend is not None:
            state.services = build_services(settings, backend)
        else:
            loader = asyncio.create_task(load())
        try:
            yield
        finally:
            state.draining = True
            if loader is not None and not loader.done():
                loader.cancel()
            svc = state.services
            if svc is not None:
                await asyncio.to_thread(svc.backend.drain, 1.0 if state.drained else settings.drain_seconds)
                svc.backend.use_vectors(None)
                if backend is None:
                    await asyncio.to_thread(svc.backend.shutdown)

    return run
