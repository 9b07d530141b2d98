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
from steering.errors import SteeringError
from steering.store import check_writable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendFactory:
    build: Callable[[ServerSettings], GenerationBackend]
    analysis: Callable[[ServerSettings], GenerationBackend] | None
    """What runs analysis jobs (attribution, vector builds, evaluations): the backend itself (``build``) or a
    companion built beside it; None: nothing."""


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


def build_vllm(settings: ServerSettings) -> GenerationBackend:
    from steering.backends.vllm.engine import VLLMBackend, VLLMConfig

    cfg = VLLMConfig(model=settings.model, name=settings.served_model_name, device=settings.device,
                     dtype=settings.dtype, max_model_len=settings.max_model_len,
                     max_num_seqs=settings.max_batch_size, max_queue_size=settings.max_queue_size,
                     max_num_batched_tokens=settings.vllm_max_num_batched_tokens, block_size=settings.vllm_block_size,
                     enforce_eager=settings.vllm_enforce_eager,
                     enable_prefix_caching=settings.vllm_enable_prefix_caching,
                     gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
                     kv_cache_gib=settings.vllm_kv_cache_gib, tensor_parallel_size=settings.vllm_tensor_parallel_size,
                     max_vectors_per_request=settings.vllm_max_vectors_per_request, bank_mib=settings.vllm_bank_mib,
                     cache_dir=settings.cache_dir, telemetry_every=settings.vllm_telemetry_every,
                     engine_args=dict(settings.vllm_engine_args))
    return VLLMBackend(cfg, limits=request_limits(settings)).start()


BACKENDS: dict[str, BackendFactory] = {
    "hf": BackendFactory(build_hf, analysis=build_hf),
    "vllm": BackendFactory(build_vllm, analysis=build_hf),
}


class AppState:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.keys = KeyRing.load(settings.api_key, settings.api_keys, settings.api_keys_file)
        self.services: Services | None = None
        self.load_error: str | None = None
        self.draining = False
        self.drained = False
        """Set once a signal-driven drain has finished (the lifespan need not wait again)."""
        self.on_load_error: Callable[[str], None] | None = None
        """Called (on the event loop) with the reason when the model fails to load; the server that runs the app
        sets it to stop the process (``server.run.SteerServer``). Without it, ``/ready`` keeps reporting it."""

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
        factory = BACKENDS[settings.backend]
        built: GenerationBackend | None = None
        try:
            await asyncio.to_thread(check_writable, settings.vector_dir)  # before minutes of model loading
            built = await asyncio.to_thread(factory.build, settings)
            companion = factory.analysis
            services = build_services(settings, built, None if companion is None else lambda: companion(settings))
            if services.analysis.mode == "start":
                await asyncio.to_thread(services.analysis.load)
            state.services = services
        except Exception as exc:  # noqa: BLE001 - reported by /ready and /health, and ends the server
            state.load_error = str(exc) or type(exc).__name__
            if isinstance(exc, SteeringError):  # a known failure (a missing or unreadable model): one line
                log.error("the model failed to load: %s", state.load_error)
            else:  # anything else is unexpected: keep the traceback
                log.exception("the model failed to load")
            if built is not None:  # built, but its analysis companion failed: stop it, the server cannot serve
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(built.shutdown)
            if state.on_load_error is not None:
                state.on_load_error(state.load_error)

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
                grace = 1.0 if state.drained else settings.drain_seconds
                await asyncio.to_thread(svc.backend.drain, grace)
                await asyncio.to_thread(svc.analysis.drain, grace)
                svc.backend.use_vectors(None)
                await asyncio.to_thread(svc.analysis.shutdown)
                if backend is None:
                    await asyncio.to_thread(svc.backend.shutdown)

    return run
