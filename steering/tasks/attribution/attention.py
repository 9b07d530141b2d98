"""Attention-based attributions: one forward per continuation with attention weights.

For the target token y_t the query is the position that predicts it (P-1+t); its row over the prompt keys is the
token's attribution. ``attention`` reads one layer (the last by default), averaged over heads; ``attention_rollout``
(Abnar & Zuidema, 2020) multiplies the head-averaged attention of every layer, each mixed half-and-half with the
identity for the residual stream and renormalised. Attention weights need the eager attention kernel, so the
model is switched to it for the chunk and switched back in ``finally``.
"""

from __future__ import annotations

import contextlib

import torch
from pydantic import Field

from steering.engine.jobs import Progress
from steering.errors import InvalidRequestError
from steering.tasks.attribution.registry import AttributionMethod, MethodOutput, MethodParams, register


@contextlib.contextmanager
def eager_attention(model):
    previous = model.config._attn_implementation
    if previous == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _attentions(runner, c: int) -> tuple[torch.Tensor, ...]:
    """Per-layer attention [H, L, L] of the prompt followed by continuation ``c``."""
    embeds = torch.cat([runner.prompt_embeds, runner.embed(runner.conts[c][:-1])]).unsqueeze(0)
    with eager_attention(runner.lm.model):
        out = runner.forward(embeds, runner.P, output_attentions=True)
    return tuple(a[0].to(runner.acc_dtype) for a in out.attentions)


def _rows(runner, per_cont) -> torch.Tensor:
    """Combine per-token rows [C][T_c, P] into objectives [K, P] with the target weights."""
    rows = torch.zeros(runner.C, runner.T, runner.P, device=runner.device, dtype=runner.acc_dtype)
    for c, r in enumerate(per_cont):
        rows[c, : r.shape[0]] = r
    return torch.einsum("ctp,kct->kp", rows, runner.W)


class AttentionParams(MethodParams):
    layer: int = Field(-1, description="decoder layer to read (negative counts from the end)")


@register
class Attention(AttributionMethod):
    name = "attention"
    Params = AttentionParams
    summary = "head-averaged attention of one layer (the last by default) from each target token's query"

    def run(self, runner, params: AttentionParams):
        n = runner.lm.num_layers
        layer = params.layer if params.layer >= 0 else n + params.layer
        if not 0 <= layer < n:
            raise InvalidRequestError(f"layer {params.layer} is out of range for a model with {n} layers",
                                         param="params.layer")
        per_cont = []
        for c in range(runner.C):
            att = _attentions(runner, c)[layer].mean(0)  # [L, L]
            q = torch.arange(runner.lengths[c], device=runner.device) + runner.P - 1
            per_cont.append(att[q, : runner.P])
            yield Progress(c + 1, runner.C, "attention")
        return MethodOutput(_rows(runner, per_cont), {"layer": layer})


@register
class AttentionRollout(AttributionMethod):
    name = "attention_rollout"
    summary = "attention rollout: product over layers of (head-averaged attention + identity) / 2"

    def run(self, runner, params):
        per_cont = []
        for c in range(runner.C):
            atts = _attentions(runner, c)
            L = atts[0].shape[-1]
            eye = torch.eye(L, device=runner.device, dtype=runner.acc_dtype)
            roll = eye
            for a in atts:
                mixed = 0.5 * a.mean(0) + 0.5 * eye
                mixed = mixed / mixed.sum(-1, keepdim=True)
                roll = mixed @ roll
            q = torch.arange(runner.lengths[c], device=runner.device) + runner.P - 1
            per_cont.append(roll[q, : runner.P])
            yield Progress(c + 1, runner.C, "attention_rollout")
        return MethodOutput(_rows(runner, per_cont))
