"""Baselines from the activations at the answers: CAA (mean difference), PCA of the paired differences, and a
linear probe. Each example's prompt is packed with both answers, so one forward pass reads both."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from steering.engine.jobs import JobContext, Progress
from steering.tasks import activations
from steering.tasks.builders.registry import (
    Builder,
    BuilderParams,
    Directions,
    Encoded,
    principal_direction,
    register,
)
from steering.tasks.packing import answer_rows

Position = Literal["answer_mean", "last"]


class ContrastParams(BuilderParams):
    position: Position = Field("answer_mean", description="the answer tokens' mean state, or the last token's")


class ProbeParams(ContrastParams):
    l2: float = Field(1e-3, ge=0, description="L2 penalty on the standardised weights")
    max_iter: int = Field(200, ge=1, le=10000)


def answer_states(ctx: JobContext, data: list[Encoded], layers: list[int], position: Position):
    """Job generator: {layer: (preferred [N, h], dispreferred [N, h])} at the answer tokens."""
    rows, groups = [], []
    for e in data:
        P, A, B = len(e.prompt), len(e.preferred), len(e.dispreferred)
        rows.append(answer_rows(e.prompt, [e.preferred, e.dispreferred], e.images))
        if position == "last":
            groups.append([[P + A - 1], [P + A + B - 1]])
        else:
            groups.append([list(range(P, P + A)), list(range(P + A, P + A + B))])
    states = yield from activations.collect(ctx, rows, groups, layers)
    return {layer: (s[0::2], s[1::2]) for layer, s in states.items()}


def _norms(states) -> dict[int, float]:
    return {layer: float(pos.norm(dim=-1).mean()) for layer, (pos, _) in states.items()}


@register
class CAA(Builder):
    name = "caa"
    Params = ContrastParams
    summary = "contrastive activation addition: mean of (preferred - dispreferred) activations at the answers"

    def run(self, ctx: JobContext, data: list[Encoded], layers: list[int], params: ContrastParams):
        states = yield from answer_states(ctx, data, layers, params.position)
        values = {layer: (pos - neg).mean(0) for layer, (pos, neg) in states.items()}
        return Directions(values, per_layer={"hidden_norm": _norms(states)})


@register
class PCA(Builder):
    name = "pca"
    Params = ContrastParams
    summary = "first principal component of the paired differences, oriented along their mean"

    def run(self, ctx: JobContext, data: list[Encoded], layers: list[int], params: ContrastParams):
        states = yield from answer_states(ctx, data, layers, params.position)
        values, ev = {}, {}
        for layer, (pos, neg) in states.items():
            diff = pos - neg
            values[layer], ev[layer] = principal_direction(diff) if len(diff) > 1 else (diff[0], 1.0)
        return Directions(values, per_layer={"hidden_norm": _norms(states), "explained_variance": ev})


@register
class Probe(Builder):
    name = "probe"
    Params = ProbeParams
    summary = "weight vector of an L2-regularised logistic regression separating preferred from dispreferred"

    def run(self, ctx: JobContext, data: list[Encoded], layers: list[int], params: ProbeParams):
        states = yield from answer_states(ctx, data, layers, params.position)
        yield Progress(0, 1, "probe")
        # All layers at once: x [Lyr, 2N, h], standardised per layer by its mean and one scalar scale (so the
        # weight direction stays a direction of the raw space).
        x = torch.stack([torch.cat([pos, neg]) for pos, neg in states.values()]).to(torch.float64)
        n = x.shape[1] // 2
        y = torch.cat([torch.ones(n), torch.zeros(n)]).to(torch.float64)
        x = x - x.mean(1, keepdim=True)
        x = x / x.norm(dim=-1).mean(1).clamp_min(1e-12).view(-1, 1, 1) * x.shape[-1] ** 0.5
        w = torch.zeros(x.shape[0], x.shape[-1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(x.shape[0], 1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=params.max_iter, line_search_fn="strong_wolfe")

        def loss_fn():
            opt.zero_grad()
            logits = torch.einsum("lnh,lh->ln", x, w) + b
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, y.expand_as(logits), reduction="none").mean(1).sum() + params.l2 * (w ** 2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(loss_fn)
        with torch.no_grad():
            acc = ((torch.einsum("lnh,lh->ln", x, w) + b > 0).to(torch.float64) == y).to(torch.float64).mean(1)
        values = {layer: w[i].detach().to(torch.float32) for i, layer in enumerate(states)}
        train = {layer: float(acc[i]) for i, layer in enumerate(states)}
        return Directions(values, per_layer={"hidden_norm": _norms(states), "train_accuracy": train})
