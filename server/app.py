"""The FastAPI app factory: ``create_app(settings, backend=None)``.

The backend named by ``settings.backend`` loads in the background at start-up (``/ready`` answers 503 until
it has loaded and while draining; ``/health`` answers 200 while its engine is alive); a backend passed in
(tests, embedding) is used as is. The routers for analysis jobs (attribution, evaluations, jobs) are mounted
when the server runs them (on the backend itself, or on a Hugging Face engine beside it: ``settings.analysis``);
otherwise those paths answer 501.
"""

from __future__ import annotations

from fastapi import FastAPI

from server.errors import install_error_handlers
from server.lifespan import BACKENDS, AppState, lifespan
from server.middleware import BodyLimits, HTTPMetrics
from server.openapi import AllowMethods, install_openapi
from server.routes import attribution, evaluation, jobs, openai, playground, probes, tokenize, unavailable, vectors
from server.settings import ServerSettings
from steering import __version__
from steering.engine.base import AnalysisBackend, GenerationBackend


def create_app(settings: ServerSettings | None = None, backend: GenerationBackend | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    state = AppState(settings)
    app = FastAPI(title="steerserve", version=__version__, lifespan=lifespan(state, backend))
    app.state.steerserve = state
    install_error_handlers(app, settings.retry_after_seconds)
    install_openapi(app)
    app.add_middleware(BodyLimits, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout_seconds)
    app.add_middleware(AllowMethods, router_app=app)
    app.add_middleware(HTTPMetrics, router_app=app)  # outermost: sees every response, the 413s and 204s too
    if settings.analysis == "off":
        analysis = False
    elif backend is not None:
        analysis = isinstance(backend, AnalysisBackend)
    else:
        analysis = BACKENDS[settings.backend].analysis is not None
    for module in (probes, openai, tokenize, vectors, playground):
        app.include_router(module.router)
    for module in (attribution, evaluation, jobs) if analysis else (unavailable,):
        app.include_router(module.router)
    return app
