"""The FastAPI app factory: ``create_app(settings, engine=None)``.

The model loads in the background at start-up (``/ready`` answers 503 until it has loaded and while
draining; ``/health`` answers 200 while the engine thread is alive). A pre-built engine can be passed in
(tests). Routes are thin: they parse, call a service object, and format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Annotated

import torch
from fastapi import Body, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.errors import APIError, error_body, install_error_handlers
from server.metrics import Metrics
from server.protocol import (
    AttributionRequest,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EvaluationRequest,
    TokenizeRequest,
    VectorBuildRequest,
    VectorRename,
    VectorSweepRequest,
    VectorUpload,
)
from server.services import (
    AttributionService,
    EngineClient,
    EvaluationService,
    GenerationService,
    JobService,
    ModelService,
    TokenizerService,
    VectorService,
)
from server.settings import ServerSettings
from steering import __version__
from steering.engine import Engine, EngineConfig
from steering.errors import SteeringValidationError
from steering.gguf_vectors import import_controlvector
from steering.loading import load_model
from steering.registry import ModelIdentity, VectorRegistry
from steering.vectors import SteeringVector

log = logging.getLogger(__name__)


@dataclass
class Services:
    engine: Engine
    metrics: Metrics
    generation: GenerationService
    models: ModelService
    tokenizer: TokenizerService
    vectors: VectorService
    jobs: JobService
    attributions: AttributionService
    evaluations: EvaluationService
    model_name: str


class AppState:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.services: Services | None = None
        self.load_error: str | None = None
        self.draining = False

    def require(self) -> Services:
        if self.services is None:
            msg = f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            raise APIError(503, msg, headers={"Retry-After": "5"})
        if self.draining:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"})
        return self.services


def build_services(settings: ServerSettings, engine: Engine) -> Services:
    lm = engine.lm
    name = settings.served_model_name or lm.name
    registry = VectorRegistry(settings.vector_dir, ModelIdentity.of(lm))
    registry.load_all()
    metrics = Metrics(name)
    metrics.bind(engine, registry)
    client = EngineClient(lm, engine, registry, metrics, settings)
    generation = GenerationService(client, name)
    jobs = JobService(client, keep=settings.keep_finished_jobs)
    return Services(engine=engine, metrics=metrics, generation=generation,
                    models=ModelService(lm, engine, name, int(time.time())),
                    tokenizer=TokenizerService(lm, engine, generation),
                    vectors=VectorService(client, registry, jobs), jobs=jobs,
                    attributions=AttributionService(client, generation, settings),
                    evaluations=EvaluationService(client, jobs, settings), model_name=name)


class BodyLimit:
    """ASGI middleware: bodies larger than the limit get 413 (by Content-Length, or while streaming in)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send) -> None:
        resp = JSONResponse(error_body(413, f"request body larger than {self.max_bytes} bytes"), status_code=413)
        await send({"type": "http.response.start", "status": 413, "headers": resp.raw_headers})
        await send({"type": "http.response.body", "body": resp.body})


class _TooLarge(Exception):
    pass


def create_app(settings: ServerSettings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    state = AppState(settings)
    owns_engine = engine is None

    async def load() -> None:
        try:
            lm = await asyncio.to_thread(load_model, settings.model, device=settings.device, dtype=settings.dtype,
                                         cache_dir=settings.cache_dir)
            eng = Engine(lm, EngineConfig(max_batch_size=settings.max_batch_size,
                                          max_queue_size=settings.max_queue_size,
                                          max_model_len=settings.max_model_len, max_jobs=settings.max_jobs,
                                          job_chunk_tokens=settings.job_chunk_tokens)).start()
            state.services = build_services(settings, eng)
            log.info("model %s loaded on %s (%s)", lm.name, lm.device, lm.dtype)
        except Exception as exc:  # noqa: BLE001 - reported by /ready and /health
            log.exception("model failed to load")
            state.load_error = str(exc)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = None
        if engine is not None:
            state.services = build_services(settings, engine)
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
                deadline = time.monotonic() + 30
                while (svc.engine.num_running or svc.engine.num_waiting or svc.engine.num_jobs) \
                        and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                if owns_engine:
                    await asyncio.to_thread(svc.engine.shutdown)

    app = FastAPI(title="steerserve", version=__version__, lifespan=lifespan)
    app.state.steerserve = state
    install_error_handlers(app, settings.retry_after_seconds)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    def services() -> Services:
        return state.require()

    async def auth(request: Request) -> None:
        key = settings.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else None
        if given is None or not secrets.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                           type_="authentication_error")

    guarded = [Depends(auth)]

    # -- probes and metadata ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        if state.services is None:
            return {"status": "loading"}
        if not state.services.engine.is_alive():
            return JSONResponse({"status": "error", "error": "engine thread is not running"}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        svc = state.services
        if svc is None or state.draining or not svc.engine.is_alive():
            reason = "draining" if state.draining else (state.load_error or "loading")
            return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
        return {"status": "ready", "model": svc.model_name}

    @app.get("/version")
    async def version():
        import transformers

        return {"version": __version__, "torch": torch.__version__, "transformers": transformers.__version__}

    @app.get("/metrics")
    async def metrics():
        svc = state.services
        body = generate_latest(svc.metrics.registry) if svc else b""
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=guarded)
    async def models(svc: Services = Depends(services)):
        return svc.models.list()

    # -- generation ------------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(req: ChatCompletionRequest, request: Request, svc: Services = Depends(services)):
        gen = svc.generation
        return await _respond(request, req.stream, gen.chat_stream(req) if req.stream else gen.chat(req))

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(req: CompletionRequest, request: Request, svc: Services = Depends(services)):
        gen = svc.generation
        return await _respond(request, req.stream, gen.complete_stream(req) if req.stream else gen.complete(req))

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(req: TokenizeRequest, svc: Services = Depends(services)):
        return svc.tokenizer.tokenize(req)

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(req: DetokenizeRequest, svc: Services = Depends(services)):
        return svc.tokenizer.detokenize(req)

    # -- attribution -----------------------------------------------------------------------------------------
    @app.get("/v1/attributions/methods", dependencies=guarded)
    async def attribution_methods(svc: Services = Depends(services)):
        return svc.attributions.methods()

    @app.post("/v1/attributions", dependencies=guarded)
    async def attributions(req: AttributionRequest, request: Request, svc: Services = Depends(services)):
        return await _until_disconnect(request, svc.attributions.attribute(req))

    # -- vector store ----------------------------------------------------------------------------------------
    @app.get("/v1/steering/vectors", dependencies=guarded)
    async def list_vectors(svc: Services = Depends(services)):
        return svc.vectors.list()

    @app.get("/v1/steering/vectors/{name}", dependencies=guarded)
    async def get_vector(name: str, svc: Services = Depends(services)):
        return svc.vectors.get(name)

    @app.delete("/v1/steering/vectors/{name}", dependencies=guarded)
    async def delete_vector(name: str, svc: Services = Depends(services)):
        svc.vectors.delete(name)
        return {"id": name, "object": "steering.vector", "deleted": True}

    @app.post("/v1/steering/vectors/{name}/rename", dependencies=guarded)
    async def rename_vector(name: str, req: VectorRename, svc: Services = Depends(services)):
        return svc.vectors.rename(name, req)

    @app.get("/v1/steering/vectors/{name}/gguf", dependencies=guarded)
    async def export_vector_gguf(name: str, scale: float = 1.0, svc: Services = Depends(services)):
        if not math.isfinite(scale):
            raise APIError(400, "scale must be a finite number", "scale")
        data, dropped = svc.vectors.export_gguf(name, scale)
        headers = {"Content-Disposition": f'attachment; filename="{name}.gguf"'}
        if dropped:
            headers["X-Steerserve-Dropped-Layers"] = ",".join(map(str, dropped))
        return Response(data, media_type="application/octet-stream", headers=headers)

    @app.get("/v1/steering/methods", dependencies=guarded)
    async def vector_methods(svc: Services = Depends(services)):
        return svc.vectors.methods()

    @app.post("/v1/steering/vectors/build", dependencies=guarded, status_code=202)
    async def build_vector(req: VectorBuildRequest, svc: Services = Depends(services)):
        return svc.vectors.build(req)

    @app.post("/v1/steering/vectors/{name}/sweep", dependencies=guarded, status_code=202)
    async def sweep_vector(name: str, req: VectorSweepRequest, svc: Services = Depends(services)):
        return svc.vectors.sweep(name, req)

    # -- evaluations -----------------------------------------------------------------------------------------------
    @app.post("/v1/evaluations", dependencies=guarded, status_code=202)
    async def evaluate(req: Annotated[EvaluationRequest, Body()], svc: Services = Depends(services)):
        return svc.evaluations.submit(req)

    @app.get("/v1/evaluations/scorers", dependencies=guarded)
    async def eval_scorers(svc: Services = Depends(services)):
        return svc.evaluations.scorers()

    # -- jobs ------------------------------------------------------------------------------------------------------
    @app.get("/v1/jobs", dependencies=guarded)
    async def list_jobs(svc: Services = Depends(services)):
        return svc.jobs.list()

    @app.get("/v1/jobs/{job_id}", dependencies=guarded)
    async def get_job(job_id: str, svc: Services = Depends(services)):
        return svc.jobs.get(job_id)

    @app.post("/v1/jobs/{job_id}/cancel", dependencies=guarded)
    async def cancel_job(job_id: str, svc: Services = Depends(services)):
        return svc.jobs.cancel(job_id)

    @app.delete("/v1/jobs/{job_id}", dependencies=guarded)
    async def delete_job(job_id: str, svc: Services = Depends(services)):
        return svc.jobs.cancel(job_id)

    @app.post("/v1/steering/vectors", dependencies=guarded, status_code=201)
    async def upload_vector(request: Request, svc: Services = Depends(services)):
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            name, vec, overwrite, description = await _vector_from_form(request)
        else:
            try:
                payload = VectorUpload.model_validate_json(await request.body())
            except ValueError as exc:
                raise APIError(400, _first_error(exc), "values") from exc
            vec = SteeringVector({int(k): torch.tensor(v, dtype=torch.float32) for k, v in payload.values.items()})
            name, overwrite, description = payload.name, payload.overwrite, payload.description
        return svc.vectors.put(name, vec, overwrite, description)

    return app


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        errs = errors()
        if errs:
            e = errs[0]
            where = ".".join(str(p) for p in e.get("loc", ()))
            msg = "unknown field (not part of this API)" if e.get("type") == "extra_forbidden" else e.get("msg")
            return f"{where}: {msg}" if where else str(msg)
    return str(exc)


async def _vector_from_form(request: Request):
    import tempfile

    form = await request.form()
    allowed = {"name", "file", "overwrite", "description"}
    unknown = set(form.keys()) - allowed
    if unknown:
        raise APIError(400, f"unknown form fields: {sorted(unknown)}; allowed: {sorted(allowed)}")
    name, upload = form.get("name"), form.get("file")
    if not isinstance(name, str) or upload is None or isinstance(upload, str):
        raise APIError(400, "multipart upload needs a 'name' field and a 'file' (safetensors, or a llama.cpp "
                       "control-vector GGUF)", "file")
    data = await upload.read()
    is_gguf = data[:4] == b"GGUF"
    with tempfile.NamedTemporaryFile(suffix=".gguf" if is_gguf else ".safetensors") as fh:
        fh.write(data)
        fh.flush()
        try:
            vec = import_controlvector(fh.name) if is_gguf else SteeringVector.load(fh.name)
        except SteeringValidationError as exc:
            label = getattr(upload, "filename", None) or "the uploaded file"
            raise APIError(400, exc.message.replace(fh.name, label), "file") from exc
        except Exception as exc:  # noqa: BLE001 - any parse failure is the client's file
            raise APIError(400, f"not a valid safetensors or GGUF steering vector: {exc}", "file") from exc
    overwrite = str(form.get("overwrite", "false")).lower() in ("1", "true", "yes")
    desc = form.get("description")
    return name, vec, overwrite, desc if isinstance(desc, str) else None


async def _respond(request: Request, stream: bool, work):
    """SSE for a stream (its set-up errors still answer as plain 4xx/503), else the full response."""
    if stream:
        return StreamingResponse(await work, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _until_disconnect(request, work)


async def _until_disconnect(request: Request, work):
    """Await a non-streaming generation; if the client disconnects first, cancel it."""
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
