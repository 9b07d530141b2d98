"""ReAGent (Zhao & Shan, 2024): recursive attribution by random replacement, without gradients.

For every target token y_t (probability p_o given the real prompt) each of ``num_probes`` probes keeps logit
scores s over the prompt positions, starting from U(0, 1), and repeats up to ``max_steps`` times:

1. replace each prompt token with probability ``replacing_ratio`` (a replacement token from the sampler) and
   measure the target's probability p_r; with D = p_o - p_r, replaced positions get +D and kept ones -D,
   added to s through logit((d + 1) / 2);
2. stopping check: keep only the top ``keep_top_n`` positions of softmax(s), replace all others, and stop the
   probe when y_t is still among the model's ``stopping_top_k`` next tokens.

The importance is softmax(s) averaged over the probes that stopped (over all probes if none did); it is
non-negative and sums to 1 over the prompt. Replacements are uniform over the vocabulary (special tokens
excluded) or the model's own next-token prediction at that position (its argmax other than the real token).

Work is shared across target tokens: each probe's replaced prompt is scored for every target token in one
forward (all continuations' tokens at once), and all probes run as one batch; only the stopping checks,
whose kept sets differ per target token, need a row per (probe, target token) still running.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from steering.engine.jobs import Progress
from steering.tasks.attribution.registry import AttributionMethod, MethodOutput, MethodParams, register


class ReagentParams(MethodParams):
    keep_top_n: int = Field(5, ge=1, description="prompt tokens kept in the stopping check")
    keep_ratio: float | None = Field(None, gt=0, le=1, description="keep this share of the prompt instead")
    replacing_ratio: float = Field(0.3, gt=0, lt=1)
    stopping_top_k: int = Field(3, ge=1)
    num_probes: int = Field(16, ge=1)
    max_steps: int = Field(100, ge=1)
    sampler: Literal["uniform", "model"] = "uniform"
    seed: int = 0


class _Sampler:
    def __init__(self, runner, kind: str, gen: torch.Generator) -> None:
        lm = runner.lm
        vocab = min(len(lm.tokenizer), int(lm.model.get_output_embeddings().weight.shape[0]))
        allowed = torch.ones(vocab, dtype=torch.bool)
        special = [i for i in lm.special_token_ids if i < vocab]
        allowed[special] = False
        self.allowed = allowed.nonzero().squeeze(1)
        self.gen = gen
        self.device = runner.device
        self.P = runner.P
        self.predicted: torch.Tensor | None = None
        if kind == "model":
            prompt = runner.prompt
            out = runner.forward(runner.prompt_embeds.unsqueeze(0), runner.P)
            logits = lm.logits(out.last_hidden_state[0, :-1]).float()[:, :vocab].clone()  # predicts tokens 1..P-1
            logits[:, ~allowed.to(logits.device)] = -math.inf
            logits[torch.arange(self.P - 1), prompt[1:]] = -math.inf  # never "replace" a token by itself
            self.predicted = logits.argmax(-1)

    def __call__(self, n: int) -> torch.Tensor:
        draw = self.allowed[torch.randint(len(self.allowed), (n, self.P), generator=self.gen)].to(self.device)
        if self.predicted is not None:
            draw[:, 1:] = self.predicted  # the first token has no prefix to predict it from
        return draw


@register
class Reagent(AttributionMethod):
    name = "reagent"
    Params = ReagentParams
    summary = "ReAGent: recursive random replacement; importance from the drop in the target's probability"

    def run(self, runner, params: ReagentParams):
        P, dev = runner.P, runner.device
        gen = torch.Generator().manual_seed(params.seed)
        targets = [(c, t) for c in range(runner.C) for t in range(runner.lengths[c])]
        cj = torch.tensor([c for c, _ in targets], device=dev)
        tj = torch.tensor([t for _, t in targets], device=dev)
        N, J = params.num_probes, len(targets)
        # Keep fewer tokens than the prompt has: keeping all of them would pass the stopping check trivially.
        keep_n = max(1, min(P - 1, math.ceil(params.keep_ratio * P) if params.keep_ratio else params.keep_top_n))
        sample = _Sampler(runner, params.sampler, gen)
        lp0, _ = runner.token_stats(runner.prompt.unsqueeze(0))
        p_o = lp0[0, cj, tj].exp()  # [J]
        s = torch.rand(N, J, P, generator=gen, dtype=runner.acc_dtype).to(dev)
        done = torch.zeros(N, J, dtype=torch.bool, device=dev)
        chunk = runner.rows_per_chunk(runner.C)
        steps = 0
        while steps < params.max_steps and not bool(done.all()):
            steps += 1
            # 1. random replacement, scored for every target token at once
            replaced = torch.rand(N, P, generator=gen).to(dev) < params.replacing_ratio
            ids = torch.where(replaced, sample(N), runner.prompt)
            p_r = []
            for start in range(0, N, chunk):
                lp, _ = runner.token_stats(ids[start:start + chunk])
                p_r.append(lp[:, cj, tj].exp())
                yield Progress(steps, params.max_steps, "reagent: replace")
            delta = (p_o - torch.cat(p_r)).unsqueeze(-1)  # [N, J, 1]
            d = torch.where(replaced.unsqueeze(1), delta, -delta)
            update = torch.logit(((d + 1) / 2).clamp(1e-6, 1 - 1e-6))
            s = torch.where(done.unsqueeze(-1), s, s + update)
            # 2. stopping check for the (probe, target token) pairs still running
            n_idx, j_idx = (~done).nonzero(as_tuple=True)
            kept = torch.zeros(len(n_idx), P, dtype=torch.bool, device=dev)
            kept.scatter_(1, s[n_idx, j_idx].topk(keep_n, dim=-1).indices, True)
            check = torch.where(kept, runner.prompt, sample(len(n_idx)))
            for c in range(runner.C):
                rows = (cj[j_idx] == c).nonzero().squeeze(1)
                for start in range(0, len(rows), chunk * runner.C):
                    r = rows[start:start + chunk * runner.C]
                    _, rank = runner.token_stats(check[r], conts=[c])
                    hit = rank[torch.arange(len(r), device=dev), 0, tj[j_idx[r]]] < params.stopping_top_k
                    done[n_idx[r], j_idx[r]] |= hit
                    yield Progress(steps, params.max_steps, "reagent: stopping check")
        importance = torch.softmax(s, dim=-1)  # [N, J, P]
        w = done.float()
        count = w.sum(0)  # [J]
        stopped = (importance * w.unsqueeze(-1)).sum(0) / count.clamp_min(1).unsqueeze(-1)
        final = torch.where(count.unsqueeze(-1) > 0, stopped, importance.mean(0))
        rows = torch.zeros(runner.C, runner.T, P, device=dev, dtype=runner.acc_dtype)
        rows[cj, tj] = final
        info = {"steps": steps, "probes_stopped": count.int().tolist(),
                "targets_without_stopped_probe": int((count == 0).sum())}
        return MethodOutput(torch.einsum("ctp,kct->kp", rows, runner.W), info)
