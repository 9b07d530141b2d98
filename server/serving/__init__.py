"""HTTP-free services, one per endpoint family, over the backend contract only (:mod:`steering.engine.base`).
:func:`build_services` makes them once the backend has loaded; routes call them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from server.metrics import Metrics
from server.serving.analysis import AnalysisHost, AnalysisServices
from server.serving.attribution import AttributionService
from server.serving.evaluation import EvaluationService
from server.serving.generation import GenerationService
from server.serving.jobs import JobService
from server.serving.models import ModelService
from server.serving.submission import Submitter
from server.serving.tokenizer import TokenizerService
from server.serving.vectors import VectorService
from server.settings import ServerSettings, request_limits
from steering.engine.base import AnalysisBackend, GenerationBackend
from steering.store import VectorStore, check_writable
from steering.tasks import attribution as attr
from steering.tasks import builders


@dataclass
class Services:
    backend: GenerationBackend
    store: VectorStore
    metrics: Metrics
    submitter: Submitter
    models: ModelService
    generation: GenerationService
    tokenizer: TokenizerService
    vectors: VectorService
    analysis: AnalysisHost
    jobs: JobService | None
    """None when the server runs no analysis jobs."""

    @property
    def attributions(self) -> AttributionService:
        return self.analysis.get().attributions

    @property
    def evaluations(self) -> EvaluationService:
        return self.analysis.get().evaluations


def build_services(settings: ServerSettings, backend: GenerationBackend,
                   analysis: Callable[[], GenerationBackend] | None = None) -> Services:
    """The services over ``backend``. Analysis jobs run on ``backend`` when it can run them; otherwise on the
    backend ``analysis()`` builds (when ``settings.analysis`` says: at start, on first use, or never)."""
    info = backend.info
    check_writable(settings.vector_dir)  # a store nobody can write fails the start, not the first upload
    store = VectorStore(settings.vector_dir, info.identity())
    store.load_all()
    backend.use_vectors(store)
    backend.limits = request_limits(settings)  # the server's bounds govern every request it takes
    models = ModelService(info, settings.served_model_name)
    metrics = Metrics(models.name)
    metrics.bind(backend, store)

    def wire(engine: GenerationBackend) -> AnalysisServices:
        assert isinstance(engine, AnalysisBackend)
        if engine is not backend:
            engine.use_vectors(store)
            engine.limits = backend.limits
            metrics.bind_jobs(engine)
        submitter = Submitter(engine, metrics)
        attributions = AttributionService(engine, submitter, jobs_service, models, metrics, attr.AttributionLimits(
            max_input_tokens=settings.attribution_max_input_tokens,
            max_target_tokens=settings.attribution_max_target_tokens, max_n_steps=settings.attribution_max_n_steps,
            max_probes=settings.attribution_max_probes, max_probe_steps=settings.attribution_max_probe_steps))
        evaluations = EvaluationService(engine, store, jobs_service, settings.eval_max_prompts,
                                        settings.eval_max_scored_rows)
        return AnalysisServices(engine, attributions, evaluations)

    if settings.analysis == "off":
        host = AnalysisHost("off", None, wire)
    elif isinstance(backend, AnalysisBackend):
        host = AnalysisHost("self", lambda: backend, wire)
    elif analysis is None:
        host = AnalysisHost("off", None, wire, f"this server's backend ({backend.kind}) runs no analysis jobs "
                                               "(attribution, vector builds and sweeps, evaluations)")
    else:
        host = AnalysisHost(settings.analysis, analysis, wire)
    jobs_service = JobService(lambda: host.get().backend, metrics, keep=settings.keep_finished_jobs)
    jobs = jobs_service if host.enabled else None
    if host.mode == "self":
        host.load()
    limits = builders.BuildLimits(max_examples=settings.build_max_examples,
                                  max_sweep_rows=settings.build_max_sweep_rows, images=backend.limits.images)
    submitter = Submitter(backend, metrics)
    return Services(
        backend=backend, store=store, metrics=metrics, submitter=submitter, models=models,
        generation=GenerationService(submitter, models),
        tokenizer=TokenizerService(backend.inputs, models, backend.limits),
        vectors=VectorService(store, backend, jobs, limits), analysis=host, jobs=jobs,
    )
