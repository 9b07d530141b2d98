"""Attribution requests: validate against the model and limits, then run as a chunked job.

``prepare`` checks everything before any model work (method and parameters, token ids, lengths, limits,
steering) and returns a :class:`PreparedAttribution`, whose ``work`` is a job for the engine
(:meth:`steering.engine.AnalysisBackend.submit_job`) or for :func:`steering.backends.hf.run_job`;
:func:`attribute` does both in one call for scripts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from steering.engine.base import ModelFront, resolve_for
from steering.engine.jobs import JobContext, Progress
from steering.errors import InvalidRequestError
from steering.multimodal import PromptImage, image_positions
from steering.spec import ResolvedSteering, SteeringSpec, bind_images
from steering.tasks.attribution.registry import AttributionMethod, MethodParams, get_method, parse_params
from steering.tasks.attribution.runner import Cost, Runner
from steering.tasks.attribution.targets import AttributionTarget

if TYPE_CHECKING:
    from steering.backends.hf.loading import LoadedModel

Reduction = Literal["sum", "l2"]


@dataclass
class AttributionLimits:
    max_input_tokens: int = 1024
    max_target_tokens: int = 128
    max_n_steps: int = 512
    max_probes: int = 64
    max_probe_steps: int = 1000

    def check(self, params: MethodParams) -> None:
        for name, limit in (("n_steps", self.max_n_steps), ("num_probes", self.max_probes),
                            ("max_steps", self.max_probe_steps)):
            value = getattr(params, name, None)
            if value is not None and value > limit:
                raise InvalidRequestError(f"params.{name} is {value}; this server allows at most {limit}",
                                             param=f"params.{name}")


@dataclass
class AttributionRequest:
    prompt_ids: list[int]
    target: AttributionTarget
    method: str = "integrated_gradients"
    params: dict[str, Any] = field(default_factory=dict)
    reduction: Reduction | None = None
    """Gradient methods only: ``sum`` (signed sum over the hidden dimension, the default) or ``l2``."""
    steering: SteeringSpec | None = None
    images: tuple[PromptImage, ...] = ()
    """The prompt's images (a vision-language model): text and image tokens are attributed together."""


@dataclass
class AttributionResult:
    method: str
    params: dict[str, Any]
    target: AttributionTarget
    reduction: Reduction | None
    prompt_ids: list[int]
    scores: torch.Tensor
    """[K, P] float32 on CPU: one row per objective (per target token for ``per_token``)."""
    token_logprobs: list[list[float]]
    """log P(y_t | x, y_<t) of each continuation's tokens under the real prompt."""
    objective: list[float]
    """Each objective's value under the real prompt."""
    special: list[bool]
    """Per prompt token: is it a special token (BOS, chat-template markers...)? Image tokens are not."""
    info: dict[str, Any]
    cost: Cost
    seconds: float
    """Wall time from the first chunk to the last (including generation steps in between)."""
    images: tuple[PromptImage, ...] = ()

    def image_grids(self) -> list[dict[str, Any]]:
        """Per image, its tokens' total scores laid out as the model lays them out (rows x columns), with the
        positions and the picture's size: what a client draws as a heatmap over the picture."""
        totals = self.totals.tolist()
        out = []
        for k, im in enumerate(self.images):
            rows, cols = im.grid
            flat = [totals[p] for p in im.positions[len(im.positions) - rows * cols:]]
            out.append({"image": k, "rows": rows, "columns": cols, "width": im.size[0], "height": im.size[1],
                        "positions": list(im.positions),
                        "scores": [flat[r * cols:(r + 1) * cols] for r in range(rows)]})
        return out

    @property
    def totals(self) -> torch.Tensor:
        """[P]: the scores summed over objectives (the per-token matrix collapsed to the whole continuation)."""
        return self.scores.sum(0)

    def top(self, k: int, negative: bool = False, include_special: bool = False) -> list[tuple[int, float]]:
        """The k most positive (or most negative) prompt positions by total score, as (position, score)."""
        totals = self.totals.tolist()
        order = sorted(range(len(totals)), key=lambda i: totals[i], reverse=not negative)
        picked = [(i, totals[i]) for i in order if include_special or not self.special[i]]
        picked = [(i, s) for i, s in picked if (s < 0 if negative else s > 0)]
        return picked[:k]


@dataclass
class PreparedAttribution:
    request: AttributionRequest
    method: type[AttributionMethod]
    params: MethodParams
    reduction: Reduction | None
    steering: ResolvedSteering | None
    """The request's steering, checked against the model."""

    def work(self, ctx: JobContext):
        return _run(self, ctx)


def check_method(method_name: str, params: dict[str, Any] | None, reduction: str | None,
                 limits: AttributionLimits) -> tuple[type[AttributionMethod], MethodParams, Reduction | None]:
    """The method, its parameters and the reduction, checked (before anything else of the request)."""
    method = get_method(method_name)
    parsed = parse_params(method, params)
    limits.check(parsed)
    if reduction is not None and reduction not in ("sum", "l2"):
        raise InvalidRequestError(f"unknown reduction {reduction!r}; valid: sum, l2", param="reduction")
    if reduction is not None and not method.gradient:
        raise InvalidRequestError(
            f"reduction applies to gradient methods only; {method.name} gives one score per token",
            param="reduction")
    return method, parsed, (reduction or "sum") if method.gradient else None  # type: ignore[return-value]


def prepare(model: ModelFront, request: AttributionRequest,
            limits: AttributionLimits | None = None) -> PreparedAttribution:
    limits = limits or AttributionLimits()
    method, params, reduction = check_method(request.method, request.params, request.reduction, limits)
    info = model.info
    vocab = info.vocab_size
    ids = request.prompt_ids
    if not ids:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    if len(ids) > limits.max_input_tokens:
        raise InvalidRequestError(
            f"the prompt has {len(ids)} tokens; attribution allows at most {limits.max_input_tokens}",
            param="prompt")
    target = request.target
    names = ("target",) if len(target.continuations) == 1 else ("preferred", "dispreferred")
    for name, cont in zip(names, target.continuations):
        if not cont:
            raise InvalidRequestError(f"the {name} continuation is empty", param=name)
        if len(cont) > limits.max_target_tokens:
            raise InvalidRequestError(
                f"the {name} continuation has {len(cont)} tokens; attribution allows at most "
                f"{limits.max_target_tokens}", param=name)
        if any(not 0 <= t < vocab for t in cont):
            raise InvalidRequestError(f"{name} token ids must be in [0, {vocab})", param=name)
    if any(not 0 <= t < vocab for t in ids):
        raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
    limit = info.max_model_len
    if len(ids) + target.max_len > limit:
        raise InvalidRequestError(
            f"prompt and continuation need {len(ids) + target.max_len} tokens; the model allows {limit}",
            param="prompt")
    at = image_positions(request.images)
    if request.images and (not info.vision or any(not 0 <= p < len(ids) for p in at)):
        raise InvalidRequestError("this model does not take images" if not info.vision else
                                  "the images' positions are outside the prompt", param="messages")
    model.inputs.check_image_tokens(ids, request.images)
    steering = resolve_for(model, request.steering) if request.steering is not None else None
    if steering is not None:
        steering = bind_images(steering, at)
    return PreparedAttribution(request, method, params, reduction, steering)


def _run(prep: PreparedAttribution, ctx: JobContext):
    t0 = time.monotonic()
    req = prep.request
    runner = Runner(ctx, req.prompt_ids, req.target, prep.steering.applications if prep.steering else (),
                    req.images)
    lp, _ = runner.token_stats(runner.prompt.unsqueeze(0))  # [1, C, T]
    objective = torch.einsum("ct,kct->k", lp[0], runner.W).tolist()
    token_logprobs = [lp[0, c, : n].tolist() for c, n in enumerate(runner.lengths)]
    yield Progress(0, None, "start")
    out = yield from prep.method().run(runner, prep.params)
    scores = out.scores
    if scores.dim() == 3:  # gradient methods: reduce the hidden dimension
        scores = scores.sum(-1) if prep.reduction == "sum" else torch.linalg.vector_norm(scores, dim=-1)
    special_ids = ctx.lm.special_token_ids
    image_at = set(image_positions(req.images))  # image tokens are content, not markup
    return AttributionResult(
        method=prep.method.name, params=prep.params.model_dump(), target=req.target, reduction=prep.reduction,
        prompt_ids=list(req.prompt_ids), scores=scores.cpu(), token_logprobs=token_logprobs, objective=objective,
        special=[t in special_ids and i not in image_at for i, t in enumerate(req.prompt_ids)], info=out.info,
        cost=runner.cost,
        seconds=time.monotonic() - t0, images=req.images,
    )


def attribute(lm: LoadedModel, request: AttributionRequest, *, limits: AttributionLimits | None = None,
              chunk_tokens: int = 2048, on_progress: Callable[[Progress], Any] | None = None) -> AttributionResult:
    """Validate and run one attribution on this thread (no engine needed)."""
    from steering.backends.hf.jobs import run_job

    prep = prepare(lm, request, limits)
    return run_job(prep.work, lm, chunk_tokens=chunk_tokens, name="attribution", on_progress=on_progress)
