"""Scoring answers: the summed log-probability of each answer's tokens after its prompt, batched and packed.

Each prompt is packed with all of its answers in one row (:mod:`steering.tasks.packing`), so the prompt is computed
once per item; rows are chunked to the job's token budget. Optional per-item steering applies through the
backend's runner exactly as in generation (positions absolute; the prompt is the ``prompt`` part and the answers
the ``generated`` part). This is what vector sweeps and evaluations are built on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from steering.engine.jobs import JobContext, Progress
from steering.tasks.packing import PackedBatch, Segment, answer_rows, pack, targets


def packed_forward(ctx: JobContext, batch: PackedBatch, *, embeds: torch.Tensor | None = None,
                   apps: Sequence[Sequence[Any]] | None = None,
                   capture: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run the decoder over a packed batch (token ids, or ``embeds`` [n, L, d] for gradient work) with
    per-row steering ``apps`` (each from ``ctx.steering``); return the last hidden states [n, L, d]."""
    out = ctx.forward(positions=batch.positions, prompt_lens=batch.prompt_lens,
                      input_ids=None if embeds is not None else batch.ids, inputs_embeds=embeds, keep=batch.keep,
                      steering=apps, capture=capture)
    return out.last_hidden_state


def group_logprobs(lm, hidden: torch.Tensor, tgt) -> torch.Tensor:
    """Summed log-probability [G] of each continuation group, from hidden states [n, L, d] (differentiable)."""
    pred, tok, grp, groups = tgt
    acc = torch.float64 if lm.dtype == torch.float64 else torch.float32
    logits = lm.logits(hidden.flatten(0, 1)[pred]).to(acc)  # [M, V]
    lp = logits.gather(-1, tok.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.zeros(len(groups), device=lp.device, dtype=acc).index_add(0, grp, lp)


def chunks(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Greedy consecutive chunks of indices whose rows (padded to the chunk's longest) fit ``budget`` tokens;
    a single row over the budget gets a chunk of its own."""
    out: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if cur and max(longest, n) * (len(cur) + 1) > budget:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    return out


@dataclass
class ScoredItem:
    logprobs: list[float]
    """Summed log-probability of each answer."""
    lengths: list[int]
    """Tokens in each answer."""


def score_answers(ctx: JobContext, items: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                  apps: Sequence[Sequence[Any]] | None = None, stage: str = "scoring"):
    """Job generator: for each (prompt ids, [answer ids, ...]) the answers' summed log-probabilities, with the
    item's steering ``apps[i]`` (from ``ctx.steering``; empty: unsteered). Returns list[ScoredItem]; yields once
    per chunk."""
    rows: list[list[Segment]] = [answer_rows(p, answers) for p, answers in items]
    lengths = [sum(len(s.ids) for s in r) for r in rows]
    out: list[ScoredItem | None] = [None] * len(rows)
    done = 0
    for idx in chunks(lengths, ctx.chunk_tokens):
        sub = [rows[i] for i in idx]
        batch = pack(sub, ctx.lm.pad_id, ctx.lm.device)
        tgt = targets(batch, sub)
        hidden = packed_forward(ctx, batch, apps=[apps[i] for i in idx] if apps is not None else None)
        sums = group_logprobs(ctx.lm, hidden, tgt).tolist()
        per_row: dict[int, list[float]] = {}
        for (r, _), s in zip(tgt[3], sums):
            per_row.setdefault(r, []).append(s)
        for r, i in enumerate(idx):
            out[i] = ScoredItem(per_row[r], [len(a) for a in items[i][1]])
        done += len(idx)
        yield Progress(done, len(rows), stage)
    return out
