"""Prometheus metrics, prefix ``steerserve_``, label ``model_name``, after vLLM's conventions.

Besides the engine's own series, the registry holds the process and platform collectors (``process_*``,
``python_info``) and the HTTP series that :class:`server.middleware.HTTPMetrics` records
(``steerserve_http_requests_total{method, route, status}`` and
``steerserve_http_request_duration_seconds{method, route}``, ``route`` being the route template). Every refused
request is counted once in ``steerserve_request_failure_total{reason}`` where it becomes an error response
(:mod:`server.errors`), with a reason from :data:`FAILURE_REASONS`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from steering.engine.base import GenerationBackend
from steering.engine.types import SteeringTelemetry, TelemetryReport
from steering.spec import ResolvedSteering
from steering.store import VectorStore

disable_created_metrics()  # no *_created series: dashboards only need the counters themselves

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0)
_HTTP = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_CHANGE = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0)
"""Buckets of the relative change r = ||h' - h|| / ||h|| (normalised steering rotates: r <= 2)."""
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)


FAILURE_REASONS = ("invalid_request", "unauthenticated", "forbidden", "not_found", "method_not_allowed",
                   "body_timeout", "conflict", "too_large", "rate_limited", "queue_full", "unavailable",
                   "unsupported", "engine_error", "internal_error", "client_error", "server_error")
"""Every ``reason`` label of ``steerserve_request_failure_total``: a fixed set (never derived from user text)."""

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Methods labelled as themselves; any other is ``other``."""

UNMATCHED_ROUTE = "unmatched"
"""The ``route`` label of a request that matched no route (never the raw path: cardinality stays bounded)."""


def vector_labels(names: Iterable[str | None]) -> list[str]:
    """The ``vector`` labels of applied vectors: a stored vector's name, ``inline`` for one given in the request
    (so clients cannot grow the series set at will: names are only those of the store)."""
    return list(dict.fromkeys(name or "inline" for name in names))


def steering_labels(resolved: ResolvedSteering) -> list[str]:
    """The labels of the vectors a resolved steering applies (with a non-zero scale)."""
    return vector_labels(app.name for app in resolved.active)


class Metrics:
    """One registry per app, so several apps (tests) never share counters."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, lbl = self.registry, ["model_name"]
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.running = Gauge("steerserve_num_requests_running", "Requests in the running batch.", lbl, registry=r)
        self.waiting = Gauge("steerserve_num_requests_waiting", "Requests waiting for a batch slot.", lbl,
                             registry=r)
        self.vectors_loaded = Gauge("steerserve_steering_vectors_loaded", "Vectors in the registry.", lbl,
                                    registry=r)
        self.prompt_tokens = Counter("steerserve_prompt_tokens", "Prefilled prompt tokens.", lbl, registry=r)
        self.generation_tokens = Counter("steerserve_generation_tokens", "Generated tokens.", lbl, registry=r)
        self.success = Counter("steerserve_request_success", "Finished requests (aborts included).",
                               lbl + ["finished_reason"], registry=r)
        self.failure = Counter("steerserve_request_failure", "Requests that failed.", lbl + ["reason"],
                               registry=r)
        self.generation_requests = Counter("steerserve_generation_requests", "Generation requests accepted (chat "
                                           "and completions; once per request, whatever its prompts and n): the "
                                           "denominator of the steered share.", lbl, registry=r)
        self.steered = Counter("steerserve_steered_requests", "Requests steered, by vector (once per request "
                               "and vector with a non-zero scale, whatever its n).", lbl + ["vector"], registry=r)
        self.steered_tokens = Counter("steerserve_steered_tokens", "Tokens steered, by decoder layer (a token counts "
                                      "once per layer some vector acts on it there).", lbl + ["layer"], registry=r)
        self.relative_change = Histogram(
            "steerserve_steering_relative_change", "Per steered request, the mean over its steered tokens and layers "
            "of ||h' - h|| / ||h|| (h the decoder layer's output), by vector (each vector the request applied; "
            "inline vectors as 'inline').", lbl + ["vector"], buckets=_CHANGE, registry=r)
        self.ttft = Histogram("steerserve_time_to_first_token_seconds", "Time to first token.", lbl,
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("steerserve_inter_token_latency_seconds", "Time between tokens.", lbl,
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram("steerserve_e2e_request_latency_seconds", "Request latency.", lbl, buckets=_E2E,
                             registry=r)
        self.queue_time = Histogram("steerserve_request_queue_time_seconds", "Time waiting for a slot.", lbl,
                                    buckets=_LATENCY, registry=r)

        self.jobs = Gauge("steerserve_num_jobs", "Background jobs (attributions...) queued or running.", lbl,
                          registry=r)
        self.attributions = Counter("steerserve_attribution_requests", "Attribution requests, by method and "
                                    "outcome.", lbl + ["method", "status"], registry=r)
        self.attribution_seconds = Histogram("steerserve_attribution_compute_seconds", "Model time of an "
                                             "attribution.", lbl + ["method"], buckets=_E2E, registry=r)

        self.job_outcomes = Counter("steerserve_jobs", "Background jobs (vector builds, sweeps) by type and outcome.",
                                    lbl + ["type", "status"], registry=r)
        self.http_requests = Counter("steerserve_http_requests", "HTTP requests, by method, route template and "
                                     "status.", ["method", "route", "status"], registry=r)
        self.http_seconds = Histogram("steerserve_http_request_duration_seconds", "HTTP request latency (until "
                                      "the response's last byte, streams included), by route template.",
                                      ["method", "route"], buckets=_HTTP, registry=r)
        self.job_seconds = Histogram("steerserve_job_compute_seconds", "Model time of a finished job.",
                                     lbl + ["type"], buckets=_E2E + (900.0, 1800.0, 3600.0), registry=r)

    def bind(self, backend: GenerationBackend, store: VectorStore) -> None:
        """Gauges read live state at scrape time."""
        m = self.model_name
        self.running.labels(m).set_function(lambda: backend.stats().running)
        self.waiting.labels(m).set_function(lambda: backend.stats().waiting)
        self.vectors_loaded.labels(m).set_function(lambda: len(store))
        self.jobs.labels(m).set_function(lambda: backend.stats().jobs)
        for reason in ("stop", "length", "abort"):
            self.success.labels(m, reason)
        for reason in FAILURE_REASONS:
            self.failure.labels(m, reason)
        self.prompt_tokens.labels(m)
        self.generation_tokens.labels(m)
        self.generation_requests.labels(m)

    def bind_jobs(self, backend: GenerationBackend) -> None:
        """Jobs run on another backend than generation (vLLM generates, Hugging Face analyses)."""
        self.jobs.labels(self.model_name).set_function(lambda: backend.stats().jobs)

    def finished(self, reason: str | None, prompt_tokens: int, generated: int, metrics: Any) -> None:
        m = self.model_name
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(generated)
        if reason == "error":
            self.failure.labels(m, "engine_error").inc()
        else:
            self.success.labels(m, reason or "unknown").inc()
        if metrics is not None:
            if metrics.queue_time is not None:
                self.queue_time.labels(m).observe(metrics.queue_time)
            if metrics.first_token_time is not None:
                self.ttft.labels(m).observe(metrics.first_token_time - metrics.arrival_time)
            if metrics.finished_time is not None:
                self.e2e.labels(m).observe(metrics.finished_time - metrics.arrival_time)

    def refused(self, reason: str) -> None:
        """Count a refused request (called once per error response, by :mod:`server.errors`)."""
        self.failure.labels(self.model_name, reason if reason in FAILURE_REASONS else "server_error").inc()

    def rejected(self, reason: str) -> None:
        """Kept for callers that used to count their own refusals: every refusal is now counted once, where it
        becomes an error response (:func:`server.errors.count_refusal`), so counting here would count it twice."""

    def generation_request(self) -> None:
        self.generation_requests.labels(self.model_name).inc()

    def steered_request(self, vectors: Iterable[str]) -> None:
        """One steered request (all of its ``n`` choices together): once per distinct vector."""
        for name in dict.fromkeys(vectors):
            self.steered.labels(self.model_name, name).inc()

    def steering_measured(self, vectors: Iterable[str], telemetry: SteeringTelemetry) -> None:
        """A steered request's telemetry: its mean relative change under each vector it applied, its steered
        tokens per layer."""
        m = self.model_name
        change = telemetry.relative_change
        if change is not None:
            for name in dict.fromkeys(vectors):
                self.relative_change.labels(m, name).observe(change)
        self.layer_tokens(telemetry.layer_tokens)

    def layer_tokens(self, counts: dict[int, int]) -> None:
        for layer, n in counts.items():
            if n:
                self.steered_tokens.labels(self.model_name, str(layer)).inc(n)

    def telemetry_report(self, report: TelemetryReport) -> None:
        """What a backend measured in its workers since the last scrape."""
        for names, telemetry in report.requests:
            self.steering_measured(vector_labels(names), telemetry)
        self.layer_tokens(report.layer_tokens)

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in HTTP_METHODS else "other"
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_seconds.labels(method, route).observe(seconds)

    def attribution_done(self, method: str, status: str, job_metrics: Any) -> None:
        self.attributions.labels(self.model_name, method, status).inc()
        if status == "ok":
            self.attribution_seconds.labels(self.model_name, method).observe(job_metrics.compute_seconds)

    def job_done(self, type_: str, status: str, job_metrics: Any) -> None:
        self.job_outcomes.labels(self.model_name, type_, status).inc()
        if status == "succeeded":
            self.job_seconds.labels(self.model_name, type_).observe(job_metrics.compute_seconds)
