"""Occlusion: leave one prompt token out and measure how much each objective drops.

score_i = f(x) - f(x without token i). ``remove`` deletes the token (the sequence gets one shorter);
``replace`` overwrites it with the pad token (the EOS token when there is none), keeping positions. All P
variants are batched, as many per forward as fit the chunk token budget, and every variant serves every
objective at once (one forward for all target tokens).
"""

from __future__ import annotations

from typing import Literal

import torch

from steering.engine.jobs import Progress
from steering.errors import InvalidRequestError
from steering.tasks.attribution.registry import AttributionMethod, MethodOutput, MethodParams, register


class OcclusionParams(MethodParams):
    mode: Literal["remove", "replace"] = "remove"


@register
class Occlusion(AttributionMethod):
    name = "occlusion"
    Params = OcclusionParams
    summary = "drop of the objective when one prompt token is removed (or replaced by the pad token)"

    def run(self, runner, params: OcclusionParams):
        P = runner.P
        x = runner.prompt_embeds  # [P, d]: an image token's embedding is its feature
        if params.mode == "remove" and P < 2:
            raise InvalidRequestError("occlusion by removal needs a prompt of at least 2 tokens",
                                         param="params.mode")
        if params.mode == "remove" and runner.fixed_length:
            raise InvalidRequestError("this prompt's images set its rotary positions or attention, which removing "
                                      "a token would move; use mode 'replace'", param="params.mode")
        f_x = runner.objectives(x.unsqueeze(0))[0]  # [K]
        keep = ~torch.eye(P, dtype=torch.bool, device=x.device)
        if params.mode == "remove":
            variants = x.expand(P, P, -1)[keep].view(P, P - 1, x.shape[-1])
        else:
            pad = runner.embed(torch.tensor([runner.pad_id], device=x.device))[0]
            variants = torch.where(keep.unsqueeze(-1), x.expand(P, P, -1), pad)
        step = runner.rows_per_chunk(runner.C, variants.shape[1])
        drops = []
        for start in range(0, P, step):
            f_var = runner.objectives(variants[start:start + step])  # [m, K]
            drops.append(f_x.unsqueeze(0) - f_var)
            yield Progress(min(start + step, P), P, "occlusion")
        return MethodOutput(torch.cat(drops).T.contiguous(), {"f_input": f_x.tolist()})
