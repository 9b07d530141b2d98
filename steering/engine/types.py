"""The values that cross the backend seam: requests, their outputs and timing, the model's description and the
engine's load. Plain data, independent of how a backend runs the model."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from steering.multimodal import PromptImage
from steering.sampling import SamplingParams, TokenLogprob
from steering.spec import SteeringSpec


@dataclass(frozen=True)
class ModelIdentity:
    """What a vector records of the model it was built for; a vector is refused by a model that differs."""

    name: str
    hidden_size: int
    num_layers: int
    model_type: str | None = None
    vocab_size: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def mismatches(self, other: dict[str, Any]) -> list[str]:
        """The fields of a recorded identity that differ from this one (fields it lacks are not compared)."""
        return [f"{k} {other[k]!r} (loaded: {v!r})" for k, v in self.as_dict().items()
                if other.get(k) is not None and v is not None and other[k] != v]


@dataclass(frozen=True)
class ModelInfo:
    """The model a backend serves, as clients and request preparation see it."""

    name: str
    architecture: str
    model_type: str | None
    hidden_size: int
    num_layers: int
    max_model_len: int
    """Longest prompt + completion the backend runs."""
    vocab_size: int
    """Rows of the output embedding: valid token ids are 0..vocab_size-1."""
    source: str = ""
    device: str = "cpu"
    dtype: str = "float32"
    vision: bool = False
    """The model takes images in its prompts (a vision-language model on a backend that runs them)."""

    def identity(self) -> ModelIdentity:
        return ModelIdentity(self.name, self.hidden_size, self.num_layers, self.model_type, self.vocab_size)


@dataclass
class GenerationRequest:
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    steering: SteeringSpec | None = None
    request_id: str = field(default_factory=lambda: f"req-{uuid.uuid4().hex}")
    priority: int = 0
    """0 for interactive requests; above 0 for background work (an evaluation's generations), which a backend
    may hold to a share of its batch so that interactive requests keep flowing."""
    images: tuple[PromptImage, ...] = ()
    """The prompt's images, placed in ``prompt_token_ids`` (:mod:`steering.multimodal`)."""


@dataclass
class RequestMetrics:
    arrival_time: float
    scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def queue_time(self) -> float | None:
        return None if self.scheduled_time is None else self.scheduled_time - self.arrival_time


@dataclass
class SteeringTelemetry:
    """What a request's steering did to its hidden states: r = ||h' - h|| / ||h|| summed over the (token, layer)
    pairs it was measured on (every steered pair, or a sample of the steps) and their number, and the steered
    tokens per layer (empty where the backend counts them for all requests together)."""

    change_sum: float = 0.0
    measured: int = 0
    layer_tokens: dict[int, int] = field(default_factory=dict)

    @property
    def relative_change(self) -> float | None:
        """The mean r over the measured pairs; None when none was measured."""
        return self.change_sum / self.measured if self.measured else None


@dataclass
class TelemetryReport:
    """Steering telemetry a backend measured away from its requests' outputs (in its worker processes), since its
    last report: each finished steered request's, with the names of the vectors it applied (None for an inline
    one), and the steered tokens per layer of all its requests together."""

    requests: list[tuple[tuple[str | None, ...], SteeringTelemetry]] = field(default_factory=list)
    layer_tokens: dict[int, int] = field(default_factory=dict)


@dataclass
class RequestOutput:
    """What one step produced for one request: a delta. The last one has ``finished`` set."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    num_prompt_tokens: int
    num_generated_tokens: int
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    error: Exception | None = None
    metrics: RequestMetrics | None = None
    time: float = 0.0  # time.monotonic() when the engine produced it
    num_cached_tokens: int | None = None
    """Prompt tokens read from a prefix cache instead of computed (backends with one report it)."""
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """With ``sampling.prompt_logprobs``: one entry per prompt token, the first None (nothing precedes it); set
    on the request's first output only."""
    steering_telemetry: SteeringTelemetry | None = None
    """On a steered request's last output, from backends that measure it in the request's own process (the
    Hugging Face engine); others report it later (:meth:`GenerationBackend.pull_telemetry`)."""


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    stop_reason: str | int | None
    metrics: RequestMetrics | None
    num_cached_tokens: int | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """With ``sampling.prompt_logprobs``: as :attr:`RequestOutput.prompt_logprobs` (from the first output)."""
    steering_telemetry: SteeringTelemetry | None = None
    """As :attr:`RequestOutput.steering_telemetry` (from the last output)."""


@dataclass(frozen=True)
class EngineStats:
    """The engine's load, read at scrape time and by work that sizes itself to it."""

    running: int
    waiting: int
    jobs: int = 0
    max_running: int = 1
    """Most sequences decoded together (batch slots)."""
    max_waiting: int = 1
    """Most requests accepted but not yet running."""

    @property
    def idle(self) -> bool:
        return not (self.running or self.waiting or self.jobs)


@dataclass
class Progress:
    done: int
    total: int | None = None
    stage: str = ""
    fraction: float | None = None
    """Of the whole job (0..1), when the job can estimate it; else done / total is the stage's."""

    def overall(self) -> float | None:
        if self.fraction is not None:
            return self.fraction
        return self.done / self.total if self.total else None


@dataclass
class JobMetrics:
    arrival_time: float = field(default_factory=time.monotonic)
    start_time: float | None = None
    finished_time: float | None = None
    chunks: int = 0
    compute_seconds: float = 0.0
    """Seconds spent in this job's chunks (the rest of its wall time went to generation and other jobs)."""
