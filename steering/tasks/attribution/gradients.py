"""Gradient methods over the prompt's input embeddings: integrated gradients, saliency, input x gradient.

All three are one loop: evaluate the objectives' gradients at points x' + a (x - x') along the straight path
from a baseline x' to the input x, weight them, and sum. Integrated gradients uses n quadrature points
(Gauss-Legendre or a Riemann rule, as Captum names them) and multiplies by (x - x'); saliency is the gradient
at x; input x gradient is x times it. Every point of the path is one batch row per continuation; rows are
batched up to the chunk token budget, and all objectives of a chunk (one per target token for a per-token
matrix) share its forward pass and go through one batched backward.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from steering.engine.jobs import Progress
from steering.tasks.attribution.registry import AttributionMethod, MethodOutput, MethodParams, register

IntegrationMethod = Literal["gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"]


def integration_points(n: int, method: IntegrationMethod) -> tuple[torch.Tensor, torch.Tensor]:
    """Points a in [0, 1] and weights (summing to 1) of an n-point rule for the path integral."""
    if method == "gausslegendre":
        points, weights = np.polynomial.legendre.leggauss(n)
        return torch.tensor(0.5 * (points + 1.0)), torch.tensor(0.5 * weights)
    if method == "riemann_trapezoid":
        if n < 2:
            raise ValueError("riemann_trapezoid needs n_steps >= 2")
        w = torch.full((n,), 1.0 / (n - 1), dtype=torch.float64)
        w[0] = w[-1] = 0.5 / (n - 1)
        return torch.linspace(0, 1, n, dtype=torch.float64), w
    k = torch.arange(n, dtype=torch.float64)
    offset = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[method]
    return (k + offset) / n, torch.full((n,), 1.0 / n, dtype=torch.float64)


def path_gradients(runner, alphas: torch.Tensor, weights: torch.Tensor, x: torch.Tensor, baseline: torch.Tensor,
                   max_rows: int | None = None):
    """Generator: sum over points of weight * d(objective k)/d(embedding) at baseline + a (x - baseline).

    Returns [K, P, d] (float32). Yields after every forward and every backward group (one chunk each)."""
    K, P = runner.K, runner.P
    n = len(alphas)
    acc = torch.zeros(K, P, x.shape[-1], device=x.device, dtype=runner.acc_dtype)
    m = min(max_rows or n, runner.rows_per_chunk(runner.C), n)
    # Objectives per backward group: keep (group x rows x length) within the chunk budget too.
    group = max(1, min(K, runner.rows_per_chunk(runner.C * m)))
    a_dev = alphas.to(x.device, runner.acc_dtype)
    w_dev = weights.to(x.device, runner.acc_dtype)
    for start in range(0, n, m):
        a = a_dev[start:start + m].to(x.dtype).view(-1, 1, 1)
        with torch.enable_grad():
            emb = (baseline + a * (x - baseline)).detach().requires_grad_(True)  # [m, P, d]
            obj = runner.objectives(emb)  # [m, K]
        yield Progress(start, n, "forward")
        for g0 in range(0, K, group):
            ks = list(range(g0, min(K, g0 + group)))
            grads = runner.vjp(obj, emb, ks, retain=g0 + group < K)  # [g, m, P, d]
            acc[ks] += torch.einsum("gmpd,m->gpd", grads.to(acc.dtype), w_dev[start:start + m])
            yield Progress(min(start + m, n), n, "backward")
        del obj, emb
    return acc


class IGParams(MethodParams):
    n_steps: int = Field(32, ge=1, description="quadrature points along the path")
    method: IntegrationMethod = "gausslegendre"
    baseline: Literal["zeros", "pad", "eos"] = "zeros"
    """``zeros``: the all-zero embedding; ``pad``: the pad token's embedding (the EOS token's when the
    tokenizer has no pad token) at every prompt position; ``eos``: the EOS token's embedding. (Models built
    with a padding index keep the pad embedding at zero, where ``pad`` equals ``zeros``.)"""
    internal_batch_size: int | None = Field(None, ge=1, description="path points per forward (default: fit the "
                                                                    "chunk token budget)")

    @model_validator(mode="after")
    def _trapezoid_needs_two(self) -> IGParams:
        if self.method == "riemann_trapezoid" and self.n_steps < 2:
            raise ValueError("riemann_trapezoid needs n_steps >= 2")
        return self


@register
class IntegratedGradients(AttributionMethod):
    name = "integrated_gradients"
    Params = IGParams
    gradient = True
    summary = "(x - x') times the path integral of the gradient from a baseline x' (zeros or pad embedding)"

    def run(self, runner, params: IGParams):
        x = runner.prompt_embeds  # [P, d] (an image token's: its feature)
        if params.baseline == "zeros":
            base = torch.zeros_like(x)
        else:
            tok_id = runner.pad_id if params.baseline == "pad" else runner.eos_id
            base = runner.embed(torch.full_like(runner.prompt, tok_id)).detach()
        alphas, weights = integration_points(params.n_steps, params.method)
        acc = yield from path_gradients(runner, alphas, weights, x, base, params.internal_batch_size)
        attr = acc * (x - base).to(acc.dtype)
        # Completeness: the summed attributions approximate f(x) - f(x'); report how closely.
        f = runner.objectives(torch.stack([x, base]))  # [2, K]
        total = attr.sum(dim=(1, 2))
        delta = total - (f[0] - f[1])
        info = {"completeness": {
            "f_input": f[0].tolist(), "f_baseline": f[1].tolist(), "sum_of_attributions": total.tolist(),
            "delta": delta.tolist(),
        }}
        return MethodOutput(attr, info)


class _GradientAtInput(AttributionMethod):
    """The objectives' gradient at the input itself, optionally times the input."""

    gradient = True
    times_input = False

    def run(self, runner, params):
        x = runner.prompt_embeds
        acc = yield from path_gradients(runner, torch.ones(1), torch.ones(1), x, torch.zeros_like(x))
        return MethodOutput(acc * x.to(acc.dtype) if self.times_input else acc)


@register
class Saliency(_GradientAtInput):
    name = "saliency"
    summary = "the gradient of the objective w.r.t. each input embedding"


@register
class InputXGradient(_GradientAtInput):
    name = "input_x_gradient"
    times_input = True
    summary = "each input embedding times the objective's gradient w.r.t. it"
