"""The vector store, vector building and sweeps, and the jobs that run them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.protocol.common import LAYER_VALUES, LayerKey, PositionsField, Strict, VectorName
from steering.datasets import PreferenceExample
from steering.tasks.builders import BuildRequest, SweepConfig
from steering.vectors import SteeringVector


class VectorUpload(Strict):
    """A vector given as JSON: ``values`` is {layer: [hidden floats]}."""

    name: VectorName
    values: Annotated[dict[LayerKey, list[float]], Field(min_length=1, json_schema_extra=LAYER_VALUES)]
    description: str | None = None
    overwrite: bool = False

    def to_core(self) -> SteeringVector:
        return SteeringVector.from_lists(self.values)


class VectorInfo(BaseModel):
    name: str
    layers: list[int]
    hidden_size: int
    norms: dict[int, float]
    metadata: dict[str, Any]


class VectorList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VectorInfo]


class VectorDeleted(BaseModel):
    id: str
    object: Literal["steering.vector"] = "steering.vector"
    deleted: bool = True


class PreferenceExampleIn(Strict):
    prompt: Annotated[str, Field(min_length=1)]
    preferred: Annotated[str, Field(min_length=1)]
    dispreferred: Annotated[str, Field(min_length=1)]

    def to_core(self) -> PreferenceExample:
        return PreferenceExample(self.prompt, self.preferred, self.dispreferred)


def examples(items: list[PreferenceExampleIn]) -> list[PreferenceExample]:
    return [e.to_core() for e in items]


class SweepSpec(Strict):
    """Layers x scales scored on validation examples (binary: preferred against dispreferred)."""

    scales: Annotated[list[float], Field(min_length=1, max_length=64)] = [0.25, 0.5, 1.0, 2.0]
    layers: list[int] | None = None
    relative: bool = True
    """Scales are fractions of each layer's mean hidden-state norm (recorded when the vector was built)."""
    normalize: bool = True
    positions: PositionsField = "all"
    metric: Literal["accuracy", "margin"] = "accuracy"

    def to_core(self) -> SweepConfig:
        return SweepConfig(scales=list(self.scales), layers=self.layers, relative=self.relative,
                           normalize=self.normalize, metric=self.metric,
                           positions=self.positions if isinstance(self.positions, str) else tuple(self.positions))


class VectorBuildRequest(Strict):
    model_config = ConfigDict(json_schema_extra={
        "if": {"required": ["sweep"], "properties": {"sweep": {"type": "object"}}},
        "then": {"required": ["validation"], "properties": {"validation": {"type": "array", "minItems": 1}}}})

    name: VectorName
    method: str = "grains"
    examples: Annotated[list[PreferenceExampleIn], Field(min_length=1)]
    params: dict[str, Any] = Field(default_factory=dict)
    """The method's parameters (``GET /v1/steering/methods`` lists them)."""
    validation: list[PreferenceExampleIn] | None = None
    sweep: SweepSpec | None = None
    overwrite: bool = False
    description: str | None = None

    def to_core(self) -> BuildRequest:
        return BuildRequest(examples=examples(self.examples), method=self.method, params=self.params,
                            validation=examples(self.validation) if self.validation else None,
                            sweep=self.sweep.to_core() if self.sweep else None)


class VectorSweepRequest(Strict):
    examples: Annotated[list[PreferenceExampleIn], Field(min_length=1)]
    sweep: SweepSpec = SweepSpec()
    params: dict[str, Any] | None = None
    """How to encode the examples (prompt_format, system_prompt, separator); default: as the vector was built."""


class VectorRename(Strict):
    new_name: VectorName
    overwrite: bool = False


class BuilderInfo(BaseModel):
    name: str
    summary: str
    params: dict[str, Any]


class BuilderList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BuilderInfo]


class JobError(BaseModel):
    message: str
    type: str
    param: str | None = None


class JobInfo(BaseModel):
    id: str
    object: Literal["job"] = "job"
    type: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    stage: str | None = None
    progress: float | None = None
    """Fraction of the current stage done (0..1), when known."""
    eta_seconds: float | None = None
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None
    compute_seconds: float
    result: dict[str, Any] | None = None
    error: JobError | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobInfo]
