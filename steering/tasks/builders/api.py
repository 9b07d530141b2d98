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
from typing import TYPE_CHECKING, Any, Literal

import torch

from steering.datasets import PreferenceExample, dataset_hash
from steering.engine.base import ModelFront
from steering.engine.jobs import JobContext, Progress, scaled
from steering.errors import InvalidRequestError
from steering.inputs import answer_separator
from steering.params import parse_params
from steering.spec import Positions, ResolvedApplication, describe_positions
from steering.tasks.builders.registry import Builder, BuilderParams, Encoded, get_builder
from steering.tasks.builders.registry import parse_params as parse_builder_params
from steering.tasks.scoring import score_answers
from steering.vectors import SteeringVector

if TYPE_CHECKING:
    from steering.backends.hf.loading import LoadedModel

Metric = Literal["accuracy", "margin"]


@dataclass
class BuildLimits:
    max_examples: int = 10_000
    max_sweep_rows: int = 200_000
    """configurations x validation examples"""


def encode(model: ModelFront, examples: list[PreferenceExample], params: BuilderParams,
           param: str = "examples") -> list[Encoded]:
    inputs, limit = model.inputs, model.info.max_model_len
    sep = answer_separator(params.prompt_format, params.separator)
    out = []
    for i, e in enumerate(examples):
        prompt = inputs.encode_prompt(e.prompt, params.prompt_format, params.system_prompt)
        pos = inputs.encode_continuation(sep + e.preferred)
        neg = inputs.encode_continuation(sep + e.dispreferred)
        if not prompt or not pos or not neg:
            raise InvalidRequestError(f"{param}[{i}]: the prompt and both answers must encode to tokens",
                                         param=f"{param}[{i}]")
        if len(prompt) + len(pos) + len(neg) > limit:
            raise InvalidRequestError(f"{param}[{i}] is longer than the model allows ({limit} tokens)",
                                      param=f"{param}[{i}]")
        out.append(Encoded(prompt, pos, neg))
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


# -- sweep ---------------------------------------------------------------------------------------------------------
@dataclass
class SweepConfig:
    scales: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0])
    layers: list[int] | None = None
    """default: every layer of the vector"""
    relative: bool = True
    """scales are fractions of each layer's mean hidden-state norm (recorded at build time)"""
    normalize: bool = True
    positions: Positions = "all"
    metric: Metric = "accuracy"


@dataclass
class SweepResult:
    metric: Metric
    baseline: dict[str, float]
    table: list[dict[str, float]]
    best: dict[str, float]
    examples: int

    def as_dict(self) -> dict:
        return {"metric": self.metric, "examples": self.examples, "baseline": self.baseline, "best": self.best,
                "table": self.table}


def _summary(margins: list[float]) -> dict[str, float]:
    n = len(margins)
    return {"accuracy": sum(m > 0 for m in margins) / n, "margin": sum(margins) / n}


def sweep_work(ctx: JobContext, vector: SteeringVector, data: list[Encoded], cfg: SweepConfig):
    """Job generator: score every (layer, scale) of ``cfg`` and the unsteered model on ``data`` (binary: the
    preferred answer's summed log-probability against the dispreferred one's). Returns a SweepResult."""
    layers = cfg.layers if cfg.layers is not None else vector.layers
    norms = vector.metadata.get("hidden_norms") or {}
    configs: list[tuple[int, float, float] | None] = [None]
    for layer in layers:
        for s in cfg.scales:
            absolute = s * float(norms[str(layer)]) if cfg.relative else s
            configs.append((layer, s, absolute))
    items: list[tuple[list[int], list[list[int]]]] = []
    apps: list[Any] = []
    for c in configs:
        app = [] if c is None else ctx.steering([ResolvedApplication(
            vector.name, {c[0]: vector.values[c[0]]}, c[2], cfg.positions, cfg.normalize)])
        for e in data:
            items.append((e.prompt, [e.preferred, e.dispreferred]))
            apps.append(app)
    scored = yield from score_answers(ctx, items, apps, stage="sweep")
    n = len(data)
    results = []
    for ci in range(len(configs)):
        margins = [s.logprobs[0] - s.logprobs[1] for s in scored[ci * n:(ci + 1) * n]]
        results.append(_summary(margins))
    baseline, table = results[0], []
    for c, r in zip(configs[1:], results[1:]):
        assert c is not None
        table.append({"layer": c[0], "scale": c[1], "scale_abs": round(c[2], 6), **r})
    best = max(table, key=lambda r: (r[cfg.metric], -abs(r["scale"]))) if table else {}
    return SweepResult(cfg.metric, baseline, table, best, n)


def check_sweep(num_layers: int, vector: SteeringVector, cfg: SweepConfig, n_examples: int,
                limits: BuildLimits | None = None) -> None:
    limits = limits or BuildLimits()
    if not cfg.scales or any(not isinstance(s, (int, float)) or s != s or abs(s) == float("inf")
                             for s in cfg.scales):
        raise InvalidRequestError("sweep scales must be a non-empty list of finite numbers", param="sweep.scales")
    if cfg.metric not in ("accuracy", "margin"):
        raise InvalidRequestError(f"unknown metric {cfg.metric!r}; valid: accuracy, margin", param="sweep.metric")
    layers = cfg.layers if cfg.layers is not None else vector.layers
    check_layers(num_layers, layers, "sweep.layers")
    missing = [x for x in layers if x not in vector.values]
    if missing:
        raise InvalidRequestError(f"the vector has no values for layers {missing}", param="sweep.layers")
    if cfg.relative:
        norms = vector.metadata.get("hidden_norms") or {}
        if any(str(x) not in norms for x in layers):
            raise InvalidRequestError("relative scales need the hidden-state norms recorded when the vector was "
                                         "built; this vector has none, use absolute scales", param="sweep.relative")
    rows = (len(layers) * len(cfg.scales) + 1) * n_examples
    if rows > limits.max_sweep_rows:
        raise InvalidRequestError(f"the sweep needs {rows} scored rows; this server allows "
                                     f"{limits.max_sweep_rows}", param="sweep")


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
    data = encode(model, request.examples, params)
    validation = None
    if request.sweep is not None and not request.validation:
        raise InvalidRequestError("a sweep needs validation examples", param="validation")
    if request.validation:
        validation = encode(model, request.validation, params, "validation")
        cfg = request.sweep or SweepConfig()
        probe = SteeringVector({x: torch.zeros(info.hidden_size) for x in layers},
                               metadata={"hidden_norms": {str(x): 1.0 for x in layers}})
        check_sweep(info.num_layers, probe, cfg, len(validation), limits)
    return PreparedBuild(request, builder, params, layers, data, validation, info.identity().as_dict())


def _build(prep: PreparedBuild, ctx: JobContext):
    t0 = time.monotonic()
    build_cost = prep.builder.cost(prep.data, prep.params)
    sweep_cost = 0.0
    if prep.validation:
        cfg = prep.request.sweep or SweepConfig()
        layers = cfg.layers if cfg.layers is not None else prep.layers
        sweep_cost = (len(layers) * len(cfg.scales) + 1) * sum(
            len(e.prompt) + len(e.preferred) + len(e.dispreferred) for e in prep.validation)
    split = build_cost / (build_cost + sweep_cost)
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
        metadata["sweep"] = {"metric": result.metric, "examples": result.examples,
                             "dataset_hash": dataset_hash(req.validation or []), "baseline": result.baseline,
                             "best": result.best, "relative": cfg.relative, "normalize": cfg.normalize,
                             "positions": describe_positions(cfg.positions)}
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
    data = encode(model, examples, encoding(vector, params))
    check_sweep(model.info.num_layers, vector, cfg, len(data), limits)
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
