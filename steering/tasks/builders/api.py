"""Building a steering vector from preference examples, and sweeping it over layers x scales.

``prepare_build`` checks the method, its parameters, the layers and every example (it tokenises them) before
any model work and returns a :class:`PreparedBuild` whose ``work`` is a job for an analysis backend
(:meth:`steering.engine.AnalysisBackend.submit_job`) or :func:`steering.backends.hf.run_job`. One pass over the
data builds every requested layer. With validation examples, the job then sweeps layers x scales and records the best
setting in the vector's metadata.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from steering.datasets import PreferenceExample, dataset_hash
from steering.engine.base import ModelFront
from steering.engine.jobs import JobContext, Progress, scaled
from steering.errors import InvalidRequestError
from steering.inputs import answer_separator
from steering.multimodal import ImageLimits, load_image
from steering.params import parse_params
from steering.tasks.builders.registry import Builder, BuilderParams, Encoded, get_builder
from steering.tasks.builders.registry import parse_params as parse_builder_params
from steering.tasks.builders.sweep import (
    SweepConfig,
    SweepResult,
    check_image_positions,
    check_sweep,
    settings_count,
    stored_setting,
    sweep_cost,
    sweep_work,
)
from steering.vectors import SteeringVector

if TYPE_CHECKING:
    from steering.backends.hf.loading import LoadedModel

@dataclass
class BuildLimits:
    max_examples: int = 10_000
    max_sweep_rows: int = 200_000
    """configurations x validation examples"""
    images: ImageLimits = field(default_factory=ImageLimits)
    """What the examples' images may be (a server's: data URLs and its image directories)."""


def encode(model: ModelFront, examples: list[PreferenceExample], params: BuilderParams,
           param: str = "examples", images: ImageLimits | None = None) -> list[Encoded]:
    """Tokenize every example (its image, if any, checked against ``images`` and placed in the prompt)."""
    inputs, limit = model.inputs, model.info.max_model_len
    sep = answer_separator(params.prompt_format, params.separator)
    limits = images or ImageLimits()
    out = []
    for i, e in enumerate(examples):
        pictures = [load_image(e.image, limits, f"{param}[{i}].image")] if e.image is not None else []
        prompt, placed = inputs.encode_prompt_images(e.prompt, pictures, params.prompt_format, params.system_prompt)
        inputs.check_image_tokens(prompt, placed, f"{param}[{i}].prompt")
        pos = inputs.encode_continuation(sep + e.preferred)
        neg = inputs.encode_continuation(sep + e.dispreferred)
        if not prompt or not pos or not neg:
            raise InvalidRequestError(f"{param}[{i}]: the prompt and both answers must encode to tokens",
                                      param=f"{param}[{i}]")
        if len(prompt) + len(pos) + len(neg) > limit:
            raise InvalidRequestError(f"{param}[{i}] is longer than the model allows ({limit} tokens)",
                                      param=f"{param}[{i}]")
        out.append(Encoded(prompt, pos, neg, placed))
    return out


def check_layers(num_layers: int, layers: list[int] | None, param: str = "params.layers") -> list[int]:
    if layers is None:
        return list(range(num_layers))
    if not layers:
        raise InvalidRequestError("layers is empty", param=param)
    bad = [x for x in layers if not 0 <= x < num_layers]
    if bad:
        raise InvalidRequestError(f"layers {bad} do not exist; the model has layers 0..{num_layers - 1}",
                                  param=param)
    return sorted(set(layers))


# -- build ---------------------------------------------------------------------------------------------------------
@dataclass
class BuildRequest:
    examples: list[PreferenceExample]
    method: str = "grains"
    params: dict[str, Any] = field(default_factory=dict)
    validation: list[PreferenceExample] | None = None
    sweep: SweepConfig | None = None


@dataclass
class BuildResult:
    vector: SteeringVector
    sweep: SweepResult | None
    seconds: float


@dataclass
class PreparedBuild:
    request: BuildRequest
    builder: type[Builder]
    params: BuilderParams
    layers: list[int]
    data: list[Encoded]
    validation: list[Encoded] | None
    identity: dict[str, Any]

    def work(self, ctx: JobContext):
        return _build(self, ctx)


def prepare_build(model: ModelFront, request: BuildRequest, limits: BuildLimits | None = None) -> PreparedBuild:
    limits = limits or BuildLimits()
    info = model.info
    builder = get_builder(request.method)
    params = parse_builder_params(builder, request.params)
    layers = check_layers(info.num_layers, params.layers)
    if not request.examples:
        raise InvalidRequestError("no examples", param="examples")
    if len(request.examples) > limits.max_examples:
        raise InvalidRequestError(f"{len(request.examples)} examples; this server allows {limits.max_examples}",
                                     param="examples")
    data = encode(model, request.examples, params, images=limits.images)
    validation = None
    if request.sweep is not None and not request.validation:
        raise InvalidRequestError("a sweep needs validation examples", param="validation")
    if request.validation:
        validation = encode(model, request.validation, params, "validation", limits.images)
        cfg = request.sweep or SweepConfig()
        probe = SteeringVector({x: torch.zeros(info.hidden_size) for x in layers},
                               metadata={"hidden_norms": {str(x): 1.0 for x in layers}})
        check_sweep(info.num_layers, probe, cfg, len(validation), limits.max_sweep_rows)
        check_image_positions(cfg, validation, "validation")
    return PreparedBuild(request, builder, params, layers, data, validation, info.identity().as_dict())


def _build(prep: PreparedBuild, ctx: JobContext):
    t0 = time.monotonic()
    build_cost = prep.builder.cost(prep.data, prep.params)
    sweep_tokens = 0.0
    if prep.validation:
        cfg = prep.request.sweep or SweepConfig()
        probe = SteeringVector({x: torch.zeros(1) for x in prep.layers})
        sweep_tokens = sum(sweep_cost(prep.validation, cfg, settings_count(probe, cfg)))
    split = build_cost / (build_cost + sweep_tokens)
    yield Progress(0, None, "start", 0.0)
    out = yield from scaled(prep.builder().run(ctx, prep.data, prep.layers, prep.params), 0.0, split)
    values, raw = {}, {}
    for layer, v in out.values.items():
        v = v.to(torch.float32).cpu()
        norm = float(v.norm())
        if not norm > 0 or not torch.isfinite(v).all():
            raise InvalidRequestError(f"the {prep.builder.name} direction at layer {layer} is zero or not finite "
                                         "(the examples do not separate there)", param="examples")
        values[layer], raw[layer] = v / norm, norm
    req = prep.request
    metadata = {
        "method": prep.builder.name,
        "params": prep.params.model_dump(),
        "model": prep.identity,
        "dataset": {"hash": dataset_hash(req.examples), "examples": len(req.examples)},
        "raw_norms": {str(k): v for k, v in raw.items()},
        "hidden_norms": {str(k): v for k, v in out.per_layer.get("hidden_norm", {}).items()},
        "stats": {name: {str(k): v for k, v in d.items()} for name, d in out.per_layer.items()
                  if name != "hidden_norm"},
        "info": out.info,
    }
    vector = SteeringVector(values, metadata=metadata)
    result = None
    if prep.validation:
        cfg = req.sweep or SweepConfig()
        result = yield from scaled(sweep_work(ctx, vector, prep.validation, cfg), split, 1.0)
        vhash = dataset_hash(req.validation or [])
        metadata["sweep"] = {"metric": result.metric, "examples": result.examples, "dataset_hash": vhash,
                             "baseline": result.baseline, "best": result.best, "fluency": result.fluency,
                             "relative": cfg.relative}
        setting = stored_setting(result, cfg, vhash)
        if setting is not None:
            metadata["setting"] = setting
    return BuildResult(vector, result, time.monotonic() - t0)


def build(lm: LoadedModel, request: BuildRequest, *, limits: BuildLimits | None = None, chunk_tokens: int = 2048,
          on_progress: Callable[[Progress], Any] | None = None) -> BuildResult:
    """Validate and build on this thread (no engine needed)."""
    from steering.backends.hf.jobs import run_job

    prep = prepare_build(lm, request, limits)
    return run_job(prep.work, lm, chunk_tokens=chunk_tokens, name="vector-build", on_progress=on_progress)


def prepare_sweep(model: ModelFront, vector: SteeringVector, examples: list[PreferenceExample],
                  cfg: SweepConfig, params: dict[str, Any] | None = None,
                  limits: BuildLimits | None = None) -> Callable[[JobContext], Any]:
    """Check a sweep of ``vector`` before any model work; return its job. ``params``: how to encode the
    examples (default: as the vector was built)."""
    limits = limits or BuildLimits()
    data = encode(model, examples, encoding(vector, params), images=limits.images)
    check_sweep(model.info.num_layers, vector, cfg, len(data), limits.max_sweep_rows)
    check_image_positions(cfg, data, "examples")
    return lambda ctx: sweep_work(ctx, vector, data, cfg)


def sweep(lm: LoadedModel, vector: SteeringVector, examples: list[PreferenceExample], cfg: SweepConfig | None = None,
          *, params: dict[str, Any] | None = None, chunk_tokens: int = 2048,
          on_progress: Callable[[Progress], Any] | None = None, limits: BuildLimits | None = None) -> SweepResult:
    """Validate and sweep on this thread."""
    from steering.backends.hf.jobs import run_job

    work = prepare_sweep(lm, vector, examples, cfg or SweepConfig(), params, limits)
    return run_job(work, lm, chunk_tokens=chunk_tokens, name="vector-sweep", on_progress=on_progress)


def encoding(vector: SteeringVector, params: dict[str, Any] | None) -> BuilderParams:
    """How to encode examples for ``vector``: ``params`` (prompt_format, system_prompt, separator), or as the
    vector was built."""
    if params is None:
        built = vector.metadata.get("params") or {}
        params = {k: built[k] for k in ("prompt_format", "system_prompt", "separator") if k in built}
    return parse_params(BuilderParams, params, "the examples' encoding")
