"""HTTP-free services, one per endpoint family, over the backend contract only (:mod:`steering.engine.base`).
:func:`build_services` makes them once the backend has loaded; routes call them."""

from __future__ import annotations

from dataclasses import dataclass

from server.metrics import Metrics
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
from steering.store import VectorStore
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
    jobs: JobService | None
    """None when the backend runs no analysis jobs (and so the next two)."""
    attributions: AttributionService | None
    evaluations: EvaluationService | None

    @property
    def analysis(self) -> bool:
        return self.jobs is not None


def build_services(settings: ServerSettings, backend: GenerationBackend) -> Services:
    info = backend.info
    store = VectorStore(settings.vector_dir, info.identity())
    store.load_all()
    backend.use_vectors(store)
    backend.limits = request_limits(settings)  # the server's bounds govern every request it takes
    models = ModelService(info, settings.served_model_name)
    metrics = Metrics(models.name)
    metrics.bind(backend, store)
    submitter = Submitter(backend, metrics)
    jobs = attributions = evaluations = None
    if isinstance(backend, AnalysisBackend):
        jobs = JobService(backend, metrics, keep=settings.keep_finished_jobs)
        attributions = AttributionService(backend, submitter, jobs, models, metrics, attr.AttributionLimits(
            max_input_tokens=settings.attribution_max_input_tokens,
            max_target_tokens=settings.attribution_max_target_tokens, max_n_steps=settings.attribution_max_n_steps,
            max_probes=settings.attribution_max_probes, max_probe_steps=settings.attribution_max_probe_steps))
        evaluations = EvaluationService(backend, store, jobs, settings.eval_max_prompts, settings.eval_max_scored_rows)
    limits = builders.BuildLimits(max_examples=settings.build_max_examples,
                                  max_sweep_rows=settings.build_max_sweep_rows)
    return Services(
        backend=backend, store=store, metrics=metrics, submitter=submitter, models=models,
        generation=GenerationService(submitter, models),
        tokenizer=TokenizerService(backend.inputs, models, backend.limits),
        vectors=VectorService(store, backend, jobs, limits), jobs=jobs, attributions=attributions,
        evaluations=evaluations,
    )
