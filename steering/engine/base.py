"""The backend contract: what the server, the evaluations and the command line may rely on.

A :class:`GenerationBackend` serves one model: it describes it (:attr:`info`), encodes prompts for it
(:attr:`inputs`), checks a request's steering against it (:meth:`resolve_steering`, the one place a steering
spec is validated), and runs requests (:meth:`submit` returns a handle that streams deltas and cancels). It
reports its load (:meth:`stats`), whether it is alive, waits for in-flight work (:meth:`drain`) and stops
(:meth:`shutdown`). The Hugging Face engine implements it, a vLLM engine can, and so does the tests' fake.

:class:`AnalysisBackend` is a separate capability: it runs jobs that need gradients or activations
(attribution, vector builds and sweeps, evaluations; see :mod:`steering.engine.jobs`). The server mounts the
endpoints that need it only when its backend has it.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from steering.engine.handles import JobHandle, RequestHandle
from steering.engine.types import EngineStats, GenerationRequest, GenerationResult, ModelInfo, TelemetryReport
from steering.errors import InvalidRequestError
from steering.inputs import Inputs
from steering.limits import RequestLimits
from steering.multimodal import image_positions
from steering.sampling import SamplingParams, StructuredOutput
from steering.spec import ResolvedSteering, SteeringSpec, bind_images, resolve

if TYPE_CHECKING:
    from steering.engine.jobs import Work
    from steering.store import VectorStore

T = TypeVar("T")


class ModelFront(Protocol):
    """What preparing a request needs of a model: its description and its input encoding. A backend is one,
    and so is a loaded model (for scripts that run jobs on their own thread)."""

    @property
    def info(self) -> ModelInfo: ...

    @property
    def inputs(self) -> Inputs: ...


class GenerationBackend(ABC):
    """Continuous generation with per-request steering over one model."""

    kind: str = "backend"
    """Short name of the implementation ("hf", "vllm", ...), for logs and /version."""
    vectors: VectorStore | None = None
    """Where named vectors are looked up (None: only inline vectors)."""
    limits: RequestLimits = RequestLimits()
    """Bounds on one request's work (stop strings...), checked by :meth:`check_request`."""

    @property
    @abstractmethod
    def info(self) -> ModelInfo: ...

    @property
    @abstractmethod
    def inputs(self) -> Inputs: ...

    def use_vectors(self, store: VectorStore | None) -> None:
        """Look named vectors up in ``store`` from now on (None: detach). A backend has one store at a time."""
        if store is not None and self.vectors is not None and self.vectors is not store:
            raise ValueError(f"this backend already looks vectors up in {self.vectors.root}; detach it first")
        self.vectors = store

    def resolve_steering(self, spec: SteeringSpec, param: str = "steering.vectors") -> ResolvedSteering:
        """Look up the spec's named vectors and check every application against this model.

        Raises SteeringValidationError for a spec that does not fit, VectorNotFoundError for an unknown name."""
        info = self.info
        lookup = self.vectors.get if self.vectors is not None else None
        return resolve(spec, hidden_size=info.hidden_size, num_layers=info.num_layers,
                       max_len=info.max_model_len, lookup=lookup, param=param)

    def check_request(self, request: GenerationRequest) -> ResolvedSteering | None:
        """What every backend checks before accepting a request: the prompt's token ids, the sampling parameters
        and their bounds, the total length, and the steering (resolved here, once)."""
        info = self.info
        ids = request.prompt_token_ids
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab = info.vocab_size
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        sp = request.sampling
        sp.validate(vocab)
        self.limits.check_stops(sp.stop, sp.stop_token_ids)
        total = len(ids) + sp.max_tokens
        if total > info.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {info.max_model_len} tokens; the request needs {total} "
                f"({len(ids)} in the prompt, {sp.max_tokens} for the completion)", param="max_tokens")
        if request.images:
            if not info.vision:
                raise InvalidRequestError(f"this backend serves {info.name} without images (it takes text only)",
                                          param="messages")
            at = image_positions(request.images)
            if any(not 0 <= p < len(ids) for p in at) or len(set(at)) != len(at):
                raise InvalidRequestError("the images' positions are not distinct positions of the prompt",
                                          param="messages")
        self.inputs.check_image_tokens(ids, request.images)
        if request.steering is None:
            return None
        return bind_images(self.resolve_steering(request.steering), image_positions(request.images))

    def prepare_structured(self, spec: StructuredOutput) -> None:  # noqa: B027 - optional hook
        """Compile a structured output's grammar ahead of ``submit`` (blocking; a server calls it off its event
        loop); raise InvalidRequestError (``param="response_format"``) if it is not valid. Default: nothing to
        prepare."""

    @abstractmethod
    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Validate and enqueue a request. With ``loop`` the handle is iterated with ``async for``.

        Raises InvalidRequestError / SteeringValidationError for a bad request, VectorNotFoundError for an
        unknown vector, QueueFullError when there is no room, EngineClosedError when not running."""

    @abstractmethod
    def stats(self) -> EngineStats: ...

    def pull_telemetry(self) -> TelemetryReport | None:
        """The steering telemetry measured since the last call, for a backend that cannot attach it to each
        request's last output (its workers measure in other processes); blocking, called when metrics are
        scraped, off the event loop. None (the default): this backend attaches it to the outputs
        (:attr:`~steering.engine.types.RequestOutput.steering_telemetry`)."""
        return None

    @abstractmethod
    def alive(self) -> bool: ...

    @abstractmethod
    def drain(self, timeout: float) -> bool:
        """Wait until nothing is running, waiting or queued as a job (or ``timeout`` seconds pass); return whether
        everything finished. Refusing new work meanwhile is the caller's part. Blocking: call it off the event
        loop."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop at once; in-flight requests end with an error."""

    def start(self) -> GenerationBackend:
        return self

    def __enter__(self) -> GenerationBackend:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def generate(self, prompt_token_ids: list[int], sampling: SamplingParams | None = None,
                 steering: SteeringSpec | None = None) -> GenerationResult:
        """Submit one request and wait for it (a convenience for scripts and tests)."""
        req = GenerationRequest(list(prompt_token_ids), sampling or SamplingParams(), steering)
        return self.submit(req).result()


class AnalysisBackend(ABC):
    """The capability to run chunked jobs that need gradients or activations."""

    @abstractmethod
    def submit_job(self, work: Work[T], name: str = "job",
                   loop: asyncio.AbstractEventLoop | None = None) -> JobHandle[T]:
        """Queue a job; it runs in chunks between generation steps. With ``loop``, await ``aresult()``.

        Raises QueueFullError when too many jobs are queued or running, EngineClosedError when not running."""


def resolve_for(model: ModelFront, spec: SteeringSpec, param: str = "steering.vectors") -> ResolvedSteering:
    """Resolve ``spec`` against ``model``: a backend looks named vectors up in its store; a bare loaded model
    takes inline vectors only."""
    if isinstance(model, GenerationBackend):
        return model.resolve_steering(spec, param)
    info = model.info
    return resolve(spec, hidden_size=info.hidden_size, num_layers=info.num_layers, max_len=info.max_model_len,
                   param=param)
