"""Integrated gradients over whole packed sequences: every token of a prompt and of its answers is attributed.

A row packs a prompt with its answers (:mod:`steering.tasks.packing`); its objective is a weighted sum of the
answers' summed log-probabilities, e.g. log P(preferred | prompt) - log P(dispreferred | prompt) with weights
+1 and -1 (GrAInS). All token embeddings of the row move together along the straight path from the baseline,
so the prompt's scores are the contrastive attribution of the shared prompt and each answer's scores are its
own tokens' share. Path points of many rows are batched up to the chunk token budget and each chunk needs one
forward and one backward (rows are independent, so the gradient of the chunk's summed objective is each row's
own gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from steering.engine.jobs import JobContext, Progress
from steering.tasks.attribution.gradients import IntegrationMethod, integration_points
from steering.tasks.packing import Segment, pack, targets
from steering.tasks.scoring import group_logprobs, packed_forward

Baseline = Literal["zeros", "pad", "eos"]


def _units(lengths: Sequence[int], n: int, budget: int) -> list[list[tuple[int, int, int]]]:
    """Chunks of (row, first point, end point): a row's points split to fit, rows batched together."""
    units: list[tuple[int, int, int]] = []
    for i, L in enumerate(lengths):
        m = max(1, min(n, budget // max(1, L)))
        units.extend((i, a, min(n, a + m)) for a in range(0, n, m))
    out: list[list[tuple[int, int, int]]] = []
    cur: list[tuple[int, int, int]] = []
    longest = count = 0
    for u in units:
        L, k = lengths[u[0]], u[2] - u[1]
        if cur and max(longest, L) * (count + k) > budget:
            out.append(cur)
            cur, longest, count = [], 0, 0
        cur.append(u)
        longest, count = max(longest, L), count + k
    if cur:
        out.append(cur)
    return out


def integrated_gradients(ctx: JobContext, rows: Sequence[Sequence[Segment]], weights: Sequence[Sequence[float]],
                         n_steps: int = 20, method: IntegrationMethod = "gausslegendre",
                         baseline: Baseline = "zeros", stage: str = "attribution"):
    """Job generator: per row, token scores [L_row] (float32, CPU; signed sum over the hidden dimension).

    ``weights[r][j]`` weighs the summed log-probability of segment ``j`` of row ``r`` in the objective (roots
    are not scored; their weight is ignored)."""
    lm = ctx.lm
    emb = lm.model.get_input_embeddings()
    pad = lm.pad_id
    alphas, qw = integration_points(n_steps, method)
    acc_dtype = torch.float64 if lm.dtype == torch.float64 else torch.float32
    lengths = [sum(len(s.ids) for s in r) for r in rows]
    grads = [torch.zeros(L, lm.hidden_size, dtype=acc_dtype, device=lm.device) for L in lengths]
    base_id = {"pad": pad, "eos": ctx.lm.tokenizer.eos_token_id}.get(baseline)
    plan = _units(lengths, n_steps, ctx.chunk_tokens)
    done = 0
    for chunk in plan:
        sub, a_list, w_list, owner = [], [], [], []
        for i, a0, a1 in chunk:
            for a in range(a0, a1):
                sub.append(rows[i])
                a_list.append(float(alphas[a]))
                w_list.append(float(qw[a]))
                owner.append(i)
        batch = pack(sub, pad, lm.device)
        tgt = targets(batch, sub)
        x = emb(batch.ids).detach()
        base = torch.zeros_like(x) if base_id is None else emb(torch.full_like(batch.ids, int(base_id))).detach()
        a_t = torch.tensor(a_list, device=lm.device, dtype=x.dtype).view(-1, 1, 1)
        gw = torch.tensor([weights[owner[r]][j] * w_list[r] for r, j in tgt[3]], device=lm.device,
                          dtype=acc_dtype)
        with torch.enable_grad():
            e = (base + a_t * (x - base)).requires_grad_(True)
            hidden = packed_forward(ctx, batch, embeds=e)
            total = (group_logprobs(lm, hidden, tgt) * gw).sum()
            (g,) = torch.autograd.grad(total, e)
        for r, i in enumerate(owner):
            grads[i] += g[r, : lengths[i]].to(acc_dtype)
        del e, hidden, total, g
        done += sum(a1 - a0 for _, a0, a1 in chunk)
        yield Progress(done, n_steps * len(rows), stage)
    out = []
    for i, row in enumerate(rows):
        ids = torch.tensor([t for s in row for t in s.ids], device=lm.device)
        x = emb(ids).detach().to(acc_dtype)
        base = torch.zeros_like(x) if base_id is None else \
            emb(torch.full_like(ids, int(base_id))).detach().to(acc_dtype)
        out.append((grads[i] * (x - base)).sum(-1).to("cpu", torch.float32))
    return out
