"""Sweeping a vector's settings on validation examples, and choosing one under a fluency budget.

A setting is where and how strongly a vector acts: the layers (one layer, or a range of layers that share the
scale: each gets scale / n), the scale (by default a fraction of each layer's mean hidden-state norm recorded at
build time), the positions (``all``, ``prompt``, ``generated``: the answer tokens when scoring) and ``normalize``.
Every setting of the grid (layer sets x scales x positions x normalize) and the unsteered model are scored on the
validation examples (binary: the preferred answer's summed log-probability against the dispreferred one's;
accuracy and mean margin).

With ``fluency``, each setting also greedily continues the first ``prompts`` validation prompts for ``max_tokens``
tokens, and those tokens are scored under the unsteered model: the perplexity ratio is the corpus perplexity of the
steered continuations over that of the unsteered ones (the definition the steering-effect evaluation uses). The
chosen setting is the best by the metric among those whose ratio is within ``budget`` (ties: the smaller scale);
when none is, there is no choice. Without ``fluency`` the best by the metric is chosen.

The choice is stored in the vector's metadata as its ``setting`` (:func:`steering.spec.stored_setting`), which a
request that names the vector without a scale then uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from steering.engine.jobs import JobContext, Progress, scaled
from steering.errors import InvalidRequestError
from steering.multimodal import PromptImage
from steering.spec import POSITION_KINDS, Positions, ResolvedApplication, describe_positions, uses_images
from steering.tasks.builders.registry import Encoded
from steering.tasks.packing import Segment, pack
from steering.tasks.scoring import chunks, item_steering, packed_forward, score_answers
from steering.vectors import SteeringVector

Metric = Literal["accuracy", "margin"]


@dataclass
class FluencyConfig:
    prompts: int = 8
    """How many validation prompts (the first ones) each setting continues."""
    max_tokens: int = 24
    budget: float = 1.2
    """The largest perplexity ratio a chosen setting may have."""


@dataclass
class SweepConfig:
    scales: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0])
    layers: list[int] | None = None
    """Single-layer settings; default: every layer of the vector (none when only ``layer_ranges`` are given)."""
    layer_ranges: list[list[int]] = field(default_factory=list)
    """Sets of layers that act together, the scale split evenly between them."""
    relative: bool = True
    """scales are fractions of each layer's mean hidden-state norm (recorded at build time)"""
    normalize: bool | list[bool] = True
    positions: Positions | list[Positions] = "all"
    metric: Metric = "accuracy"
    fluency: FluencyConfig | None = None

    def layer_sets(self, vector: SteeringVector) -> list[tuple[int, ...]]:
        singles = self.layers if self.layers is not None else ([] if self.layer_ranges else vector.layers)
        out = [(x,) for x in singles] + [tuple(sorted(set(r))) for r in self.layer_ranges]
        return list(dict.fromkeys(out))

    def position_list(self) -> list[Positions]:
        p = self.positions
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            return [tuple(p)]  # type: ignore[arg-type]  # one set of explicit positions
        return [x if isinstance(x, str) else tuple(x) for x in p]  # type: ignore[arg-type]

    def normalize_list(self) -> list[bool]:
        return [self.normalize] if isinstance(self.normalize, bool) else list(self.normalize)


@dataclass(frozen=True)
class Setting:
    layers: tuple[int, ...]
    scale: float
    scales_abs: tuple[float, ...]
    positions: Positions
    normalize: bool

    def applications(self, vector: SteeringVector) -> list[ResolvedApplication]:
        return [ResolvedApplication(vector.name, {x: vector.values[x]}, s, self.positions, self.normalize)
                for x, s in zip(self.layers, self.scales_abs, strict=True)]

    def row(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "scale": self.scale, "scale_abs": [round(s, 6) for s in self.scales_abs],
                "positions": describe_positions(self.positions), "normalize": self.normalize}


@dataclass
class SweepResult:
    metric: Metric
    baseline: dict[str, float]
    table: list[dict[str, Any]]
    best: dict[str, Any]
    """The chosen row ({} when no setting is within the fluency budget)."""
    examples: int
    fluency: dict[str, Any] | None = None

    def as_dict(self) -> dict:
        return {"metric": self.metric, "examples": self.examples, "baseline": self.baseline, "best": self.best,
                "fluency": self.fluency, "table": self.table}


def settings_of(vector: SteeringVector, cfg: SweepConfig) -> list[Setting]:
    norms = vector.metadata.get("hidden_norms") or {}
    out = []
    for layers in cfg.layer_sets(vector):
        for s in cfg.scales:
            share = s / len(layers)
            absolute = tuple(share * float(norms[str(x)]) if cfg.relative else share for x in layers)
            for pos in cfg.position_list():
                for norm in cfg.normalize_list():
                    out.append(Setting(layers, float(s), absolute, pos, bool(norm)))
    return out


def stored_setting(result: SweepResult, cfg: SweepConfig, dataset_hash: str) -> dict[str, Any] | None:
    """The chosen setting as the vector's metadata ``setting`` (None when nothing was chosen)."""
    best = result.best
    if not best:
        return None
    source: dict[str, Any] = {"kind": "sweep", "metric": result.metric, result.metric: best[result.metric],
                              "baseline": result.baseline[result.metric], "examples": result.examples,
                              "dataset_hash": dataset_hash}
    if result.fluency is not None:
        source.update(perplexity_ratio=best["perplexity_ratio"], budget=result.fluency["budget"])
    return {"layers": best["layers"], "scale": best["scale"], "relative": cfg.relative,
            "scales_abs": {str(x): s for x, s in zip(best["layers"], best["scale_abs"], strict=True)},
            "positions": best["positions"], "normalize": best["normalize"], "source": source}


def greedy_continuations(ctx: JobContext, prompts: Sequence[Sequence[int]], apps: Sequence[Sequence[Any]],
                         max_tokens: int, stop: set[int], stage: str = "fluency",
                         images: Sequence[tuple[PromptImage, ...]] | None = None):
    """Job generator: each prompt's greedy continuation (token ids, stop token excluded) with its steering
    ``apps[i]`` (from ``ctx.steering``) and its ``images[i]``. No KV cache: every step runs the whole sequences,
    prompt as the ``prompt`` part and the tokens so far as ``generated``, so positions are those of real
    generation."""
    n = len(prompts)
    out: list[list[int]] = [[] for _ in range(n)]
    live = list(range(n))
    for step in range(max_tokens):
        if not live:
            break
        rows = [[Segment(prompts[i], images=images[i] if images else ())] + ([Segment(out[i], 0)] if out[i] else [])
                for i in live]
        lengths = [len(prompts[i]) + len(out[i]) for i in live]
        nxt: dict[int, int] = {}
        for idx in chunks(lengths, ctx.chunk_tokens):
            sub = [rows[j] for j in idx]
            batch = pack(sub, ctx.lm.pad_id, ctx.lm.device)
            hidden = packed_forward(ctx, batch, apps=[apps[live[j]] for j in idx])
            last = hidden[range(len(idx)), [lengths[j] - 1 for j in idx]]
            for j, t in zip(idx, ctx.lm.logits(last).argmax(-1).tolist(), strict=True):
                nxt[live[j]] = int(t)
            yield Progress(step, max_tokens, stage)  # once per chunk: the engine runs between chunks
        still = []
        for i in live:
            if nxt[i] in stop:
                continue
            out[i].append(nxt[i])
            if len(prompts[i]) + len(out[i]) < ctx.lm.max_model_len:
                still.append(i)
        live = still
        yield Progress(step + 1, max_tokens, stage)
    return out


def _summary(margins: list[float]) -> dict[str, float]:
    n = len(margins)
    return {"accuracy": sum(m > 0 for m in margins) / n, "margin": sum(margins) / n}


def _perplexity(scored, owners: list[int], groups: int) -> list[tuple[float, int]]:
    lp, tok = [0.0] * groups, [0] * groups
    for g, s in zip(owners, scored, strict=True):
        lp[g] += s.logprobs[0]
        tok[g] += s.lengths[0]
    return list(zip(lp, tok, strict=True))


def sweep_work(ctx: JobContext, vector: SteeringVector, data: list[Encoded], cfg: SweepConfig):
    """Job generator: score every setting of ``cfg`` and the unsteered model on ``data``; with ``cfg.fluency``,
    the perplexity ratio of each setting's continuations. Returns a SweepResult."""
    settings = settings_of(vector, cfg)
    configs: list[list[ResolvedApplication]] = [[]] + [s.applications(vector) for s in settings]
    device_apps = [ctx.steering(c) if c else [] for c in configs]
    items: list[tuple[list[int], list[list[int]]]] = []
    apps: list[Any] = []
    for c, app in zip(configs, device_apps, strict=True):
        for e in data:
            items.append((e.prompt, [e.preferred, e.dispreferred]))
            apps.append(item_steering(ctx, c, e.images) if uses_images(c) else app)
    scoring, fluency_tokens = sweep_cost(data, cfg, len(configs) - 1)
    share = scoring / (scoring + fluency_tokens)
    scored = yield from scaled(score_answers(ctx, items, apps, stage="sweep", images=[e.images for e in data]
                                             * len(configs)), 0.0, share)
    n = len(data)
    results = []
    for ci in range(len(configs)):
        margins = [s.logprobs[0] - s.logprobs[1] for s in scored[ci * n:(ci + 1) * n]]
        results.append(_summary(margins))
    baseline = results[0]
    table = [{**s.row(), **r} for s, r in zip(settings, results[1:], strict=True)]
    fluency = None
    if cfg.fluency is not None:
        f = cfg.fluency
        prompts = data[: f.prompts]
        stop = set(ctx.lm.eos_token_ids)
        gen_prompts, gen_images, gen_apps, owner = [], [], [], []
        for ci, (c, app) in enumerate(zip(configs, device_apps, strict=True)):
            for e in prompts:
                gen_prompts.append(e.prompt)
                gen_images.append(e.images)
                gen_apps.append(item_steering(ctx, c, e.images) if uses_images(c) else app)
                owner.append(ci)
        conts = yield from scaled(greedy_continuations(ctx, gen_prompts, gen_apps, f.max_tokens, stop,
                                                       images=gen_images), share, share + (1 - share) * 0.9)
        keep = [i for i, c in enumerate(conts) if c]
        ppl_items = [(gen_prompts[i], [conts[i]]) for i in keep]
        ppl_scored = yield from scaled(score_answers(ctx, ppl_items, None, stage="perplexity",
                                                     images=[gen_images[i] for i in keep]),
                                       share + (1 - share) * 0.9, 1.0)
        sums = _perplexity(ppl_scored, [owner[i] for i in keep], len(configs))
        ppl = [math.exp(-lp / t) if t else float("nan") for lp, t in sums]
        for row, value in zip(table, ppl[1:], strict=True):
            ratio = value / ppl[0] if ppl[0] == ppl[0] and ppl[0] > 0 else float("nan")
            row["perplexity_ratio"] = round(ratio, 4) if math.isfinite(ratio) else None
            row["within_budget"] = row["perplexity_ratio"] is not None and row["perplexity_ratio"] <= f.budget
        fluency = {"prompts": len(prompts), "max_tokens": f.max_tokens, "budget": f.budget,
                   "unsteered_perplexity": round(ppl[0], 4) if math.isfinite(ppl[0]) else None,
                   "definition": "corpus perplexity of each setting's greedy continuations of the first validation "
                                 "prompts under the unsteered model, over the unsteered continuations' own"}
        baseline = {**baseline, "perplexity_ratio": 1.0}
    eligible = [r for r in table if r.get("within_budget", True)]
    best = max(eligible, key=lambda r: (r[cfg.metric], -abs(r["scale"]))) if eligible else {}
    return SweepResult(cfg.metric, baseline, table, best, n, fluency)


def sweep_cost(data: Sequence[Encoded], cfg: SweepConfig, settings: int) -> tuple[float, float]:
    """Tokens the sweep runs (for progress shares): (scoring, fluency). The cache-less continuations run each
    prompt and the tokens so far at every step."""
    configs = settings + 1
    scoring = configs * sum(len(e.prompt) + len(e.preferred) + len(e.dispreferred) for e in data)
    if cfg.fluency is None:
        return scoring, 0.0
    f = cfg.fluency
    steps = sum(f.max_tokens * (len(e.prompt) + f.max_tokens / 2) + len(e.prompt) + f.max_tokens
                for e in data[: f.prompts])
    return scoring, configs * steps


def settings_count(vector: SteeringVector, cfg: SweepConfig) -> int:
    return len(cfg.layer_sets(vector)) * len(cfg.scales) * len(cfg.position_list()) * len(cfg.normalize_list())


def check_sweep(num_layers: int, vector: SteeringVector, cfg: SweepConfig, n_examples: int,
                max_rows: int = 200_000) -> None:
    """Everything about a sweep that can be wrong, before any model work."""
    if not cfg.scales or any(not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s)
                             for s in cfg.scales):
        raise InvalidRequestError("sweep scales must be a non-empty list of finite numbers", param="sweep.scales")
    if cfg.metric not in ("accuracy", "margin"):
        raise InvalidRequestError(f"unknown metric {cfg.metric!r}; valid: accuracy, margin", param="sweep.metric")
    for i, r in enumerate(cfg.layer_ranges):
        if not r:
            raise InvalidRequestError("a layer range is empty", param=f"sweep.layer_ranges[{i}]")
    sets = cfg.layer_sets(vector)
    if not sets:
        raise InvalidRequestError("the sweep has no layers", param="sweep.layers")
    layers = sorted({x for s in sets for x in s})
    bad = [x for x in layers if not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < num_layers]
    if bad:
        raise InvalidRequestError(f"layers {bad} do not exist; the model has layers 0..{num_layers - 1}",
                                  param="sweep.layers")
    missing = [x for x in layers if x not in vector.values]
    if missing:
        raise InvalidRequestError(f"the vector has no values for layers {missing}", param="sweep.layers")
    positions = cfg.position_list()
    if not positions or not cfg.normalize_list():
        raise InvalidRequestError("sweep positions and normalize must not be empty lists", param="sweep")
    for p in positions:
        if isinstance(p, str) and p not in POSITION_KINDS:
            raise InvalidRequestError(f"unknown positions {p!r}; valid: {', '.join(POSITION_KINDS)} or a list of "
                                      "token positions", param="sweep.positions")
        if not isinstance(p, str) and (not p or any(not isinstance(x, int) or isinstance(x, bool) or x < 0
                                                    for x in p)):
            raise InvalidRequestError("explicit sweep positions must be a non-empty list of non-negative token "
                                      "positions", param="sweep.positions")
    if cfg.relative:
        norms = vector.metadata.get("hidden_norms") or {}
        if any(str(x) not in norms for x in layers):
            raise InvalidRequestError("relative scales need the hidden-state norms recorded when the vector was "
                                      "built; this vector has none, use absolute scales", param="sweep.relative")
    f = cfg.fluency
    if f is not None:
        if not 1 <= f.prompts <= 256:
            raise InvalidRequestError("sweep.fluency.prompts must be in [1, 256]", param="sweep.fluency.prompts")
        if not 1 <= f.max_tokens <= 256:
            raise InvalidRequestError("sweep.fluency.max_tokens must be in [1, 256]",
                                      param="sweep.fluency.max_tokens")
        if not (math.isfinite(f.budget) and f.budget >= 1.0):
            raise InvalidRequestError("sweep.fluency.budget must be a finite ratio >= 1", param="sweep.fluency.budget")
    configs = settings_count(vector, cfg) + 1
    rows = configs * n_examples
    if f is not None:
        rows += configs * min(f.prompts, n_examples) * f.max_tokens
    if rows > max_rows:
        raise InvalidRequestError(f"the sweep needs {rows} scored rows (settings x validation examples, and x "
                                  f"continuation steps for fluency); this server allows {max_rows}", param="sweep")


def check_image_positions(cfg: SweepConfig, data: Sequence[Encoded], param: str) -> None:
    """Settings that steer ``image`` positions need an image in every example."""
    if "image" in cfg.position_list():
        missing = [i for i, e in enumerate(data) if not e.images]
        if missing:
            raise InvalidRequestError(f"positions 'image' steer the examples' image tokens, and {len(missing)} "
                                      f"examples have no image (first: {param}[{missing[0]}])",
                                      param="sweep.positions")
