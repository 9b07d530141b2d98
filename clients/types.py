"""The shapes of steerserve's main responses, as ``TypedDict``s: results stay plain JSON dicts (``job["status"]``
works as before) and type checkers know their fields. They mirror the server's wire schemas (``server/protocol``)
without importing them: ``clients`` depends on nothing of the server's."""

from __future__ import annotations

from typing import Any, Literal, TypedDict

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
"""Statuses a job never leaves."""


class ModelCard(TypedDict):
    id: str
    object: str
    created: int
    owned_by: str
    max_model_len: int
    num_layers: int
    hidden_size: int


class VectorInfo(TypedDict):
    name: str
    layers: list[int]
    hidden_size: int
    norms: dict[str, float]
    """Per layer (the keys are the layers, as JSON strings)."""
    metadata: dict[str, Any]


class VectorDeleted(TypedDict):
    id: str
    object: str
    deleted: bool


class BuilderInfo(TypedDict):
    name: str
    summary: str
    params: dict[str, Any]
    """JSON schema of the builder's parameters."""


class JobError(TypedDict):
    message: str
    type: str
    param: str | None


class Job(TypedDict):
    """A background job (vector build or sweep, evaluation): its progress while it runs, its result after."""

    id: str
    object: str
    type: str
    status: JobStatus
    stage: str | None
    progress: float | None
    """Fraction of the current stage done (0..1), when known."""
    eta_seconds: float | None
    created_at: int
    started_at: int | None
    finished_at: int | None
    compute_seconds: float
    result: dict[str, Any] | None
    error: JobError | None


class ScorerInfo(TypedDict):
    name: str
    summary: str
    higher: str
    params: dict[str, Any]


class AttributionMethodInfo(TypedDict):
    name: str
    summary: str
    gradient: bool
    params: dict[str, Any]


class AppliedSteering(TypedDict):
    name: str | None
    scale: float
    layers: list[int]
    positions: str | list[int]
    normalize: bool


class AttributedToken(TypedDict):
    position: int
    id: int
    text: str
    special: bool
    score: float


class TargetToken(TypedDict):
    id: int
    text: str
    logprob: float


class RankedToken(TypedDict):
    position: int
    text: str
    score: float


class AttributionCost(TypedDict):
    forward_passes: int
    backward_passes: int
    forward_tokens: int
    backward_tokens: int
    compute_seconds: float
    seconds: float
    queue_seconds: float
    generation_seconds: float


class Attribution(TypedDict):
    """``POST /v1/attributions``: which prompt tokens drove the target."""

    id: str
    object: str
    created: int
    model: str
    method: str
    params: dict[str, Any]
    reduction: str | None
    target_type: Literal["continuation", "per_token", "contrastive"]
    generated_target: bool
    input_tokens: list[AttributedToken]
    target: list[TargetToken] | None
    preferred: list[TargetToken] | None
    dispreferred: list[TargetToken] | None
    matrix: list[list[float]] | None
    """``per_token``: one row per target token, one column per prompt token."""
    objective: list[float]
    top_positive: list[RankedToken]
    top_negative: list[RankedToken]
    info: dict[str, Any]
    cost: AttributionCost
    steering: list[AppliedSteering] | None


class Tokenized(TypedDict):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str]
