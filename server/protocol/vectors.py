"""The vector store, vector building and sweeps, and the jobs that run them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.protocol.common import LAYER_VALUES, LayerKey, PositionsField, Strict, VectorName
from steering.datasets import PreferenceExample
from steering.tasks.builders import BuildRequest, FluencyConfig, SweepConfig
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


class RefusedVector(BaseModel):
    """A file in the vector directory that this server cannot use, and why (e.g. built for another model)."""

    file: str
    name: str | None
    """The vector's name, when the file's name is a valid one."""
    reason: str


class VectorList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VectorInfo]
    refused: list[RefusedVector] = []
    """Files in the vector directory that are not usable here (not in ``data``)."""


class VectorReload(BaseModel):
    """What a re-scan of the vector directory found changed since the server last looked."""

    object: Literal["steering.vectors.reload"] = "steering.vectors.reload"
    added: list[str]
    removed: list[str]
    changed: list[str]
    refused: list[RefusedVector]
    """Every file that is not usable (not only those found this time)."""
    total: int
    """Usable vectors after the re-scan."""


class VectorDeleted(BaseModel):
    id: str
    object: Literal["steering.vector"] = "steering.vector"
    deleted: bool = True


class PreferenceExampleIn(Strict):
    prompt: Annotated[str, Field(min_length=1)]
    preferred: Annotated[str, Field(min_length=1)]
    dispreferred: Annotated[str, Field(min_length=1)]
    image: Annotated[str, Field(min_length=1)] | None = None
    """For a vision-language model: the image the prompt shows, a data URL (or a file in the server's image
    directories); checked like a chat request's images."""

    def to_core(self) -> PreferenceExample:
        return PreferenceExample(self.prompt, self.preferred, self.dispreferred, self.image)


def examples(items: list[PreferenceExampleIn]) -> list[PreferenceExample]:
    return [e.to_core() for e in items]


class FluencySpec(Strict):
    """Score each setting's fluency: greedy continuations of the first validation prompts, their perplexity under
    the unsteered model over the unsteered continuations' (the ratio); a chosen setting stays within ``budget``."""

    prompts: int = Field(8, ge=1, le=256)
    max_tokens: int = Field(24, ge=1, le=256)
    budget: float = Field(1.2, ge=1.0, allow_inf_nan=False)

    def to_core(self) -> FluencyConfig:
        return FluencyConfig(prompts=self.prompts, max_tokens=self.max_tokens, budget=self.budget)


class SweepSpec(Strict):
    """Settings scored on validation examples (binary: preferred against dispreferred): single layers and layer
    ranges (the scale split between their layers) x scales x positions x normalize; the best by ``metric`` (within
    the fluency budget when ``fluency`` is given) is chosen."""

    scales: Annotated[list[float], Field(min_length=1, max_length=64)] = [0.25, 0.5, 1.0, 2.0]
    layers: list[int] | None = None
    """Single-layer settings (default: every layer of the vector, or none when ``layer_ranges`` are given)."""
    layer_ranges: Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(max_length=64)] = []
    """Sets of layers that act together, e.g. [[4, 5, 6, 7]]: each gets scale / 4."""
    relative: bool = True
    """Scales are fractions of each layer's mean hidden-state norm (recorded when the vector was built)."""
    normalize: bool | Annotated[list[bool], Field(min_length=1, max_length=2)] = True
    positions: PositionsField | Annotated[list[PositionsField], Field(min_length=1, max_length=8)] = "all"
    """One position kind (or explicit positions), or a list of them to sweep; ``generated`` acts on the answer
    tokens only."""
    metric: Literal["accuracy", "margin"] = "accuracy"
    fluency: FluencySpec | None = None

    def to_core(self) -> SweepConfig:
        pos = self.positions
        if isinstance(pos, list) and pos and not all(isinstance(x, int) for x in pos):
            positions: Any = [x if isinstance(x, str) else tuple(x) for x in pos]  # type: ignore[arg-type]
        else:
            positions = pos if isinstance(pos, str) else tuple(pos)
        return SweepConfig(scales=list(self.scales), layers=self.layers,
                           layer_ranges=[list(r) for r in self.layer_ranges], relative=self.relative,
                           normalize=self.normalize if isinstance(self.normalize, bool) else list(self.normalize),
                           positions=positions, metric=self.metric,
                           fluency=self.fluency.to_core() if self.fluency else None)


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
    save: bool = False
    """Store the chosen setting with the vector (used when a request names it without a scale)."""


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
