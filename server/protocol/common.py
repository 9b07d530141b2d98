"""Wire types shared by every endpoint: the strict request base, the steering extension, usage, the error
envelope. Request models forbid unknown fields, so a misspelled option (``"steering": {"vector": ...}``) is a
400, never a silently unsteered generation."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, field_validator, model_validator

from steering.spec import SteeringApplication, SteeringSpec
from steering.vectors import SteeringVector


def _check_text(value: Any) -> None:
    """Text must be encodable: a lone UTF-16 surrogate (JSON "\\ud800") can be neither tokenized nor sent back."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text contains a lone UTF-16 surrogate (not valid Unicode)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k)
            _check_text(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, (str, dict, list, tuple)):
                _check_text(v)


class Strict(BaseModel):
    """A request model: unknown fields are rejected, and every text is valid Unicode."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _valid_text(cls, value: Any) -> Any:
        _check_text(value)
        return value


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


PositionsField = Literal["all", "prompt", "generated"] | list[NonNegativeInt]


class SteeringVectorRef(Strict):
    """A registered vector by ``name``, or one given inline as ``values`` ({layer: [hidden floats]})."""

    name: str | None = None
    values: dict[int, list[float]] | None = None
    scale: float = 1.0
    layers: list[int] | None = None
    positions: PositionsField = "all"
    normalize: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> SteeringVectorRef:
        if (self.name is None) == (self.values is None):
            raise ValueError("give exactly one of 'name' (a registered vector) or 'values' (an inline vector)")
        return self

    def to_core(self) -> SteeringApplication:
        vector: str | SteeringVector = self.name if self.name is not None else \
            SteeringVector.from_lists(self.values or {})
        return SteeringApplication(vector, self.scale, self.layers, self.positions, self.normalize)


class SteeringRequest(Strict):
    vectors: Annotated[list[SteeringVectorRef], Field(min_length=1, max_length=16)]

    def to_core(self) -> SteeringSpec:
        return SteeringSpec([v.to_core() for v in self.vectors])


class AppliedSteering(BaseModel):
    name: str | None
    scale: float
    layers: list[int]
    positions: str | list[int]
    normalize: bool


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
