"""The backend seam: the contract (:mod:`.base`), the values that cross it (:mod:`.types`), the caller's
handles (:mod:`.handles`) and the job protocol (:mod:`.jobs`). No backend is imported here."""

from steering.engine.base import AnalysisBackend, GenerationBackend, ModelFront, resolve_for
from steering.engine.handles import JobHandle, RequestHandle
from steering.engine.jobs import JobContext, Work, scaled, start_thread_job
from steering.engine.types import (
    EngineStats,
    GenerationRequest,
    GenerationResult,
    JobMetrics,
    ModelIdentity,
    ModelInfo,
    Progress,
    RequestMetrics,
    RequestOutput,
    SteeringTelemetry,
    TelemetryReport,
)

__all__ = [
    "AnalysisBackend",
    "EngineStats",
    "GenerationBackend",
    "GenerationRequest",
    "GenerationResult",
    "JobContext",
    "JobHandle",
    "JobMetrics",
    "ModelFront",
    "ModelIdentity",
    "ModelInfo",
    "Progress",
    "RequestHandle",
    "RequestMetrics",
    "RequestOutput",
    "SteeringTelemetry",
    "TelemetryReport",
    "Work",
    "resolve_for",
    "scaled",
    "start_thread_job",
]
