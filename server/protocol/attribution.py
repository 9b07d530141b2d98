"""``/v1/attributions``: which prompt tokens drove an output."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.protocol.common import AppliedSteering, SteeringRequest, Strict, exactly_one, new_id, not_together
from server.protocol.generation import ChatMessage


class ContrastTarget(Strict):
    preferred: Annotated[str, Field(min_length=1)]
    dispreferred: Annotated[str, Field(min_length=1)]


class AttributionRequest(Strict):
    """Which prompt tokens drove an output. The prompt is ``prompt`` (text) or ``messages`` (chat template).

    The output is ``target`` (a continuation, tokenized without special tokens and appended to the prompt), a
    ``contrast`` (log P(preferred) - log P(dispreferred)), or, when neither is given, the model's own greedy
    continuation of up to ``max_tokens`` tokens (with the request's steering)."""

    model_config = ConfigDict(json_schema_extra={"allOf": [
        exactly_one("prompt", "messages"), not_together("target", "contrast"), not_together("max_tokens", "target"),
        not_together("max_tokens", "contrast"), not_together("contrast", "per_token", {"const": True})]})

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True
    target: Annotated[str, Field(min_length=1)] | None = None
    contrast: ContrastTarget | None = None
    max_tokens: int | None = Field(None, ge=1)
    per_token: bool = False
    method: str = "integrated_gradients"
    params: dict[str, Any] = Field(default_factory=dict)
    reduction: Literal["sum", "l2"] | None = None
    top_k: int = Field(5, ge=0, le=100)
    steering: SteeringRequest | None = None

    @model_validator(mode="after")
    def _shape(self) -> AttributionRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.target is not None and self.contrast is not None:
            raise ValueError("give at most one of 'target' or 'contrast'")
        if self.max_tokens is not None and (self.target is not None or self.contrast is not None):
            raise ValueError("'max_tokens' sets the length of a generated target; it cannot be used with "
                             "'target' or 'contrast'")
        if self.per_token and self.contrast is not None:
            raise ValueError("'per_token' applies to one continuation; it cannot be used with 'contrast'")
        return self


class AttributedToken(BaseModel):
    position: int
    id: int
    text: str
    special: bool
    score: float


class TargetToken(BaseModel):
    id: int
    text: str
    logprob: float


class RankedToken(BaseModel):
    position: int
    text: str
    score: float


class ImageGrid(BaseModel):
    """One image's token scores, laid out as the model lays its tokens out: ``scores[r][c]`` belongs to the patch in
    row r, column c of the picture (draw it over the picture as a heatmap)."""

    image: int
    """Its index among the prompt's images."""
    rows: int
    columns: int
    width: int
    height: int
    """The picture's size in pixels."""
    positions: list[int]
    """The prompt positions of its tokens (their scores are also in ``input_tokens``)."""
    scores: list[list[float]]


class AttributionCost(BaseModel):
    forward_passes: int
    backward_passes: int
    forward_tokens: int
    backward_tokens: int
    compute_seconds: float
    """Seconds of model work for this attribution."""
    seconds: float
    """Wall seconds from its first chunk to its last (generation steps of other requests run in between)."""
    queue_seconds: float
    generation_seconds: float = 0.0
    """Seconds spent generating the target, when the request did not give one."""


class AttributionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("attr"))
    object: Literal["attribution"] = "attribution"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    method: str
    params: dict[str, Any]
    reduction: str | None
    target_type: Literal["continuation", "per_token", "contrastive"]
    generated_target: bool
    input_tokens: list[AttributedToken]
    """Prompt tokens with their total score (summed over target tokens for ``per_token``)."""
    images: list[ImageGrid] = []
    """Per image of the prompt, its tokens' scores as a patch grid."""
    target: list[TargetToken] | None = None
    preferred: list[TargetToken] | None = None
    dispreferred: list[TargetToken] | None = None
    matrix: list[list[float]] | None = None
    """``per_token``: one row per target token, one column per prompt token."""
    objective: list[float]
    """Each objective's value with the real prompt: summed log-probability (per token for ``per_token``) or
    the log-probability difference."""
    top_positive: list[RankedToken]
    top_negative: list[RankedToken]
    info: dict[str, Any]
    cost: AttributionCost
    steering: list[AppliedSteering] | None = None


class AttributionMethodInfo(BaseModel):
    name: str
    summary: str
    gradient: bool
    params: dict[str, Any]
    """JSON schema of the method's parameters."""


class AttributionMethodList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AttributionMethodInfo]


# -- vector building, sweeps and jobs ------------------------------------------------------------------------------
