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
from steering.multimodal import PromptImage, image_positions
from steering.spec import ResolvedApplication, ResolvedSteering, bind_images
from steering.tasks.packing import PackedBatch, Segment, answer_rows, pack, targets


def item_steering(ctx: JobContext, applications: Sequence[ResolvedApplication],
                  images: tuple[PromptImage, ...]) -> Any:
    """One prompt's steering when its applications act at ``image`` positions (bound to that prompt's images)."""
    return ctx.steering(bind_images(ResolvedSteering(tuple(applications)), image_positions(images)).applications)


def packed_embeddings(ctx: JobContext, batch: PackedBatch) -> torch.Tensor:
    """Input embeddings [n, L, d] of a packed batch: its tokens' embeddings, with each image's features in its
    tokens' places (a vision-language prompt). Detached: gradient work interpolates from here."""
    if not batch.has_images:
        return ctx.lm.model.get_input_embeddings()(batch.ids).detach()
    return ctx.vision.embed(batch.ids, batch.images())


def packed_layout(ctx: JobContext, batch: PackedBatch) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A packed batch's rotary positions (None: its token positions) and "query may see key" tensor, where its
    images change them: multimodal rotary positions (each root with images and everything below it) and
    attention inside each image in both directions, as the model's own forward would set them."""
    if not batch.has_images:
        return None, batch.keep
    keep, rope = ctx.vision.keep(batch.keep, batch.images()), None
    if ctx.vision.front.mrope:
        rope = batch.positions.unsqueeze(0).expand(3, -1, -1).clone()
        for r, segs in enumerate(batch.rows):
            for j, seg in enumerate(segs):
                if seg.images and batch.roots[r][j] == j:
                    p, delta = ctx.vision.prompt_rope(seg.ids, seg.images)
                    for k, root in enumerate(batch.roots[r]):
                        if root == j:
                            a = batch.starts[r][k]
                            rope[:, r, a:a + len(segs[k].ids)] += delta
                    a = batch.starts[r][j]
                    rope[:, r, a:a + len(seg.ids)] = p
    return rope, keep


def packed_forward(ctx: JobContext, batch: PackedBatch, *, embeds: torch.Tensor | None = None,
                   apps: Sequence[Sequence[Any]] | None = None,
                   capture: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run the decoder over a packed batch (token ids, or ``embeds`` [n, L, d] for gradient work; with images,
    :func:`packed_embeddings` when none are given) with per-row steering ``apps`` (each from ``ctx.steering``);
    return the last hidden states [n, L, d]."""
    rope, keep = packed_layout(ctx, batch)
    if embeds is None and batch.has_images:
        embeds = packed_embeddings(ctx, batch)
    out = ctx.forward(positions=batch.positions, prompt_lens=batch.prompt_lens,
                      input_ids=None if embeds is not None else batch.ids, inputs_embeds=embeds, keep=keep,
                      steering=apps, capture=capture, rope_positions=rope)
    return out.last_hidden_state


def group_logprobs(lm, hidden: torch.Tensor, tgt) -> torch.Tensor:
    """Summed log-probability [G] of each continuation group, from hidden states [n, L, d] (differentiable)."""
    pred, tok, grp, groups = tgt
    acc = torch.float64 if lm.dtype == torch.float64 else torch.float32
    logits = lm.logits(hidden.flatten(0, 1)[pred]).to(acc)  # [M, V]
    lp = logits.gather(-1, tok.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.zeros(len(groups), device=lp.device, dtype=acc).index_add(0, grp, lp)


def group_logprob_grad(lm, hidden: torch.Tensor, tgt, weights: torch.Tensor,
                       low_precision: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For gradient work: the predicting hidden states [M, d] (still in ``hidden``'s graph) and the gradient of
    ``(group_logprobs(lm, hidden, tgt) * weights).sum()`` with respect to them, in closed form
    (:meth:`LoadedModel.logprob_grad`, whose products may run in ``low_precision``);
    ``torch.autograd.grad(states, x, grad_outputs=gradient)`` then gives the objective's gradient at any input
    ``x`` of the forward."""
    pred, tok, grp, _ = tgt
    states = hidden.flatten(0, 1)[pred]
    return states, lm.logprob_grad(states, tok, weights[grp], low_precision)


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
                  apps: Sequence[Sequence[Any]] | None = None, stage: str = "scoring",
                  images: Sequence[tuple[PromptImage, ...]] | None = None):
    """Job generator: for each (prompt ids, [answer ids, ...]) the answers' summed log-probabilities, with the
    item's steering ``apps[i]`` (from ``ctx.steering``; empty: unsteered) and its prompt's ``images[i]``.
    Returns list[ScoredItem]; yields once per chunk."""
    rows: list[list[Segment]] = [answer_rows(p, answers, images[i] if images else ())
                                 for i, (p, answers) in enumerate(items)]
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
