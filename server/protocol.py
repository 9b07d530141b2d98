"""Wire schemas: OpenAI-compatible requests and responses, plus steerserve's extensions.

Every request model forbids unknown fields, so a misspelled option (``"steering": {"vector": ...}``) is a 400,
never a silently unsteered generation.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- steering extension --------------------------------------------------------------------------------------------
class SteeringVectorRef(Strict):
    """A registered vector by ``name``, or one given inline as ``values`` ({layer: [hidden floats]})."""

    name: str | None = None
    values: dict[int, list[float]] | None = None
    scale: float = 1.0
    layers: list[int] | None = None
    positions: Literal["all", "prompt", "generated"] | list[NonNegativeInt] = "all"
    normalize: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> "SteeringVectorRef":
        if (self.name is None) == (self.values is None):
            raise ValueError("give exactly one of 'name' (a registered vector) or 'values' (an inline vector)")
        return self


class SteeringRequest(Strict):
    vectors: Annotated[list[SteeringVectorRef], Field(min_length=1, max_length=16)]


class AppliedSteering(BaseModel):
    name: str | None
    scale: float
    layers: list[int]
    positions: str | list[int]
    normalize: bool


# -- shared sampling fields ----------------------------------------------------------------------------------------
class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    steering: SteeringRequest | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list["TextPart"]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[int], Field(min_length=1)]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    @model_validator(mode="after")
    def _no_echo(self) -> "CompletionRequest":
        if self.echo:
            raise ValueError("echo is not supported")
        return self


# -- responses -----------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry]


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    steering: list[AppliedSteering] | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    steering: list[AppliedSteering] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    stop_reason: str | int | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    steering: list[AppliedSteering] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "steerserve"
    max_model_len: int
    num_layers: int
    hidden_size: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- tokenizer endpoints -------------------------------------------------------------------------------------------
class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str]


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


# -- vector store --------------------------------------------------------------------------------------------------
class VectorUpload(Strict):
    name: str
    values: dict[int, list[float]]
    description: str | None = None
    overwrite: bool = False


class VectorInfo(BaseModel):
    name: str
    layers: list[int]
    hidden_size: int
    norms: dict[int, float]
    metadata: dict[str, Any]


class VectorList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VectorInfo]


# -- attribution ---------------------------------------------------------------------------------------------------
class ContrastTarget(Strict):
    preferred: Annotated[str, Field(min_length=1)]
    dispreferred: Annotated[str, Field(min_length=1)]


class AttributionRequest(Strict):
    """Which prompt tokens drove an output. The prompt is ``prompt`` (text) or ``messages`` (chat template).

    The output is ``target`` (a continuation, tokenized without special tokens and appended to the prompt), a
    ``contrast`` (log P(preferred) - log P(dispreferred)), or, when neither is given, the model's own greedy
    continuation of up to ``max_tokens`` tokens (with the request's steering)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
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
    def _shape(self) -> "AttributionRequest":
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
class PreferenceExampleIn(Strict):
    prompt: Annotated[str, Field(min_length=1)]
    preferred: Annotated[str, Field(min_length=1)]
    dispreferred: Annotated[str, Field(min_length=1)]


class SweepSpec(Strict):
    """Layers x scales scored on validation examples (binary: preferred against dispreferred)."""

    scales: Annotated[list[float], Field(min_length=1, max_length=64)] = [0.25, 0.5, 1.0, 2.0]
    layers: list[int] | None = None
    relative: bool = True
    """Scales are fractions of each layer's mean hidden-state norm (recorded when the vector was built)."""
    normalize: bool = True
    positions: Literal["all", "prompt", "generated"] | list[NonNegativeInt] = "all"
    metric: Literal["accuracy", "margin"] = "accuracy"


class VectorBuildRequest(Strict):
    name: str
    method: str = "grains"
    examples: Annotated[list[PreferenceExampleIn], Field(min_length=1)]
    params: dict[str, Any] = Field(default_factory=dict)
    """The method's parameters (``GET /v1/steering/methods`` lists them)."""
    validation: list[PreferenceExampleIn] | None = None
    sweep: SweepSpec | None = None
    overwrite: bool = False
    description: str | None = None


class VectorSweepRequest(Strict):
    examples: Annotated[list[PreferenceExampleIn], Field(min_length=1)]
    sweep: SweepSpec = SweepSpec()
    params: dict[str, Any] | None = None
    """How to encode the examples (prompt_format, system_prompt, separator); default: as the vector was built."""


class VectorRename(Strict):
    new_name: str
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


# -- evaluations ---------------------------------------------------------------------------------------------------
class EvalCondition(Strict):
    """One steered condition of an evaluation (the unsteered baseline is always added)."""

    label: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    """Default: built from the vector names, layers and scales."""
    steering: SteeringRequest
    relative: bool = False
    """Scales are fractions of each layer's mean hidden-state norm recorded when the (registered) vector was built,
    the unit of sweeps."""


class TruthfulQAQuestion(Strict):
    question: Annotated[str, Field(min_length=1)]
    best_answer: Annotated[str, Field(min_length=1)]
    correct_answers: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    incorrect_answers: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]


class TruthfulQAEvaluation(Strict):
    """TruthfulQA binary, MC1 and MC2 by summed answer log-probabilities."""

    type: Literal["truthfulqa"]
    questions: Annotated[list[TruthfulQAQuestion], Field(min_length=1)]
    conditions: Annotated[list[EvalCondition], Field(max_length=16)] = Field(default_factory=list)
    template: str = "Q: {question}\nA:"
    prompt_format: Literal["raw", "chat"] = "raw"
    system_prompt: str | None = None
    separator: str | None = None
    """Between prompt and answer; default one space for raw, nothing for chat."""
    per_question: bool = False


class SteerEvaluation(Strict):
    """Generate steered and unsteered; behaviour score, perplexity under the unsteered model, distinct-n."""

    type: Literal["steer"]
    prompts: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    conditions: Annotated[list[EvalCondition], Field(max_length=16)] = Field(default_factory=list)
    scorer: str | None = "sentiment"
    """A registered scorer (``GET /v1/evaluations/scorers``), or null for none."""
    scorer_params: dict[str, Any] = Field(default_factory=dict)
    chat: bool = True
    system_prompt: str | None = None
    max_tokens: int = Field(48, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, ge=0)
    samples: int = Field(3, ge=0, le=1000)


EvaluationRequest = Annotated[TruthfulQAEvaluation | SteerEvaluation, Field(discriminator="type")]


class ScorerInfo(BaseModel):
    name: str
    summary: str
    higher: str
    params: dict[str, Any]


class ScorerList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ScorerInfo]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
