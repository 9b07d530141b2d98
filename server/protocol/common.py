"""Wire types shared by every endpoint: the strict request base, the steering extension, usage, the error
envelope. Request models forbid unknown fields, so a misspelled option (``"steering": {"vector": ...}``) is a
400, never a silently unsteered generation."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import pydantic
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, NonNegativeInt, field_validator, model_validator

from steering.spec import SteeringApplication, SteeringSpec
from steering.store import NAME_RE, check_name
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


def _given(field: str) -> dict[str, Any]:
    return {"required": [field], "properties": {field: {"not": {"type": "null"}}}}


def exactly_one(*fields: str) -> dict[str, Any]:
    """JSON Schema for "exactly one of these fields is given (not null)"."""
    return {"oneOf": [_given(f) for f in fields]}


def not_together(a: str, b: str, b_schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """JSON Schema for "not both ``a`` and ``b`` (``b`` matching ``b_schema``)"."""
    both = {"required": [a, b], "properties": {a: {"not": {"type": "null"}},
                                               b: b_schema or {"not": {"type": "null"}}}}
    return {"not": both}


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


class Strict(BaseModel):
    """A request model: unknown fields are rejected, no value is coerced to another type (``true`` is not ``1``),
    and every text is valid Unicode."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral_numbers(cls, data: Any) -> Any:
        """JSON has one number type: 3.0 is the integer 3 (JSON Schema says so), while true is never 1."""
        return _integral(data)

    @field_validator("*", mode="after")
    @classmethod
    def _valid_text(cls, value: Any) -> Any:
        _check_text(value)
        return value


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


PositionsField = Literal["all", "prompt", "generated", "image"] | list[NonNegativeInt]
LayerKey = Annotated[int, pydantic.Strict(False)]
"""A layer index as a JSON object key ("12")."""
LAYER_VALUES = {"propertyNames": {"pattern": "^(0|[1-9][0-9]*)$"}}
"""The schema of {layer: [floats]} objects: keys are layer indices."""
VectorName = Annotated[str, AfterValidator(check_name),
                       Field(json_schema_extra={"pattern": f"^{NAME_RE.pattern}$"})]
"""A stored vector's name (:func:`steering.store.check_name`)."""


class SteeringVectorRef(Strict):
    """A registered vector by ``name``, or one given inline as ``values`` ({layer: [hidden floats]})."""

    model_config = ConfigDict(json_schema_extra=exactly_one("name", "values"))

    name: VectorName | None = None
    values: Annotated[dict[LayerKey, list[float]], Field(min_length=1, json_schema_extra=LAYER_VALUES)] | None = None
    scale: float | None = Field(None, description="default: a named vector's stored setting (the layers, scales, "
                                                  "positions and normalize its sweep chose), else 1")
    layers: list[int] | None = Field(None, description="default: every layer of the vector (its stored setting's "
                                                       "without a scale)")
    positions: PositionsField | None = Field(None, description="default: the stored setting's, else all")
    normalize: bool | None = Field(None, description="default: the stored setting's, else false")

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
