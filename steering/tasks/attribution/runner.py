"""The model work every attribution method shares: batched forwards of (prompt variant + continuation) rows
with the request's steering, per-token log-probabilities of the continuations, and batched backward passes.

A *row* is one prompt variant (ids, or embeddings for gradient methods) followed by one continuation minus its
last token; the logits at positions P-1 .. P+T-2 score the continuation's tokens. Rows of the shorter
continuation are padded on the right, which a causal model never reads. Positions are absolute, from 0, and
steering gates treat the prompt part as ``prompt`` and the continuation as ``generated``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from steering.engine.jobs import JobContext
from steering.multimodal import PromptImage, image_positions
from steering.spec import ResolvedApplication
from steering.tasks.attribution.targets import AttributionTarget


@dataclass
class Cost:
    forward_passes: int = 0
    backward_passes: int = 0
    """Vector-Jacobian products (one per objective per batch of rows)."""
    forward_tokens: int = 0
    backward_tokens: int = 0
    compute_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"forward_passes": self.forward_passes, "backward_passes": self.backward_passes,
                "forward_tokens": self.forward_tokens, "backward_tokens": self.backward_tokens,
                "compute_seconds": round(self.compute_seconds, 6)}


class Runner:
    def __init__(self, ctx: JobContext, prompt_ids: list[int], target: AttributionTarget,
                 apps: Sequence[ResolvedApplication], images: tuple[PromptImage, ...] = ()) -> None:
        lm = ctx.lm
        self.ctx = ctx
        self.lm = lm
        self.device = lm.device
        self.embedding = lm.model.get_input_embeddings()
        self.prompt = torch.tensor(prompt_ids, device=self.device)
        self.images = images
        """The prompt's images: their tokens' embeddings are their features, in every variant that keeps them."""
        self.target = target
        self.conts = [torch.tensor(c, device=self.device) for c in target.continuations]
        self.lengths = [len(c) for c in target.continuations]
        self.C, self.T, self.K = len(self.conts), target.max_len, target.num_objectives
        self.P = len(prompt_ids)
        # Scores and log-probabilities are kept in float32 (float64 for a float64 model), whatever the model dtype.
        self.acc_dtype = torch.float64 if lm.dtype == torch.float64 else torch.float32
        self.W = target.weights().to(self.device, self.acc_dtype)  # [K, C, T]
        self.steering = ctx.steering(apps)
        self.cost = Cost()
        tok = lm.tokenizer
        self.pad_id = lm.pad_id
        self.eos_id = int(tok.eos_token_id) if tok.eos_token_id is not None else self.pad_id
        self._batched_vjp = True
        self._image_at = torch.tensor(image_positions(images), device=self.device, dtype=torch.long)
        self.prompt_embeds = self.embed_prompt(self.prompt.unsqueeze(0))[0].detach()
        """[P, d]: the prompt's input embeddings (with its images' features), what gradient methods attribute."""
        self._layout = _PromptLayout(ctx, prompt_ids, images) if images else None

    @property
    def fixed_length(self) -> bool:
        """Whether prompt variants must keep the prompt's length: a prompt whose images set multimodal rotary
        positions or attention inside an image (removing a token would move them)."""
        return self._layout is not None and self._layout.structured

    # -- sizes ---------------------------------------------------------------------------------------------------
    def row_len(self, prompt_len: int | None = None) -> int:
        return (self.P if prompt_len is None else prompt_len) + self.T - 1

    def rows_per_chunk(self, per_item_rows: int, prompt_len: int | None = None) -> int:
        """How many prompt variants (each ``per_item_rows`` rows) fit the chunk token budget (at least 1)."""
        return max(1, self.ctx.chunk_tokens // (per_item_rows * self.row_len(prompt_len)))

    # -- forwards ------------------------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)

    def embed_prompt(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings [n, P', d] of prompt variants [n, P']: token embeddings, and where a variant of the prompt's
        length keeps an image token in place, that image's feature."""
        e = self.embedding(ids)
        if not self.images or ids.shape[1] != self.P:
            return e
        feats = torch.cat([self.ctx.vision.features(im) for im in self.images]).to(e.dtype)  # [I, d]
        keep = (ids[:, self._image_at] == self.prompt[self._image_at]).unsqueeze(-1)  # [n, I, 1]
        e = e.clone()
        e[:, self._image_at] = torch.where(keep, feats.unsqueeze(0), e[:, self._image_at])
        return e

    def forward(self, embeds: torch.Tensor, prompt_len: int, output_attentions: bool = False):
        """Run the decoder on [n, L, d] input embeddings with the request's steering; count the cost."""
        t0 = time.perf_counter()
        n, L = embeds.shape[:2]
        positions = torch.arange(L, device=self.device).expand(n, L)
        rope = keep = None
        if self._layout is not None and prompt_len == self.P:
            rope, keep = self._layout(positions)
        out = self.ctx.forward(
            inputs_embeds=embeds, positions=positions, prompt_lens=torch.full((n,), prompt_len, device=self.device),
            steering=[self.steering] * n if self.steering else None, output_attentions=output_attentions,
            rope_positions=rope, keep=keep)
        self.cost.forward_passes += 1
        self.cost.forward_tokens += n * L
        self.cost.compute_seconds += time.perf_counter() - t0
        return out

    def rows(self, prompt_part: torch.Tensor, conts: list[int]) -> torch.Tensor:
        """Embeddings [n * len(conts), P' + T - 1, d] of each prompt variant followed by each continuation."""
        pe = self.embed_prompt(prompt_part) if not prompt_part.is_floating_point() else prompt_part
        n, d = pe.shape[0], pe.shape[-1]
        parts = []
        for c in conts:
            tail = self.embed(self.conts[c][:-1])  # [Tc-1, d]
            if tail.shape[0] < self.T - 1:
                tail = torch.cat([tail, tail.new_zeros(self.T - 1 - tail.shape[0], d)])
            parts.append(torch.cat([pe, tail.unsqueeze(0).expand(n, -1, -1)], dim=1))
        return torch.stack(parts, dim=1).flatten(0, 1)

    def token_stats(self, prompt_part: torch.Tensor, conts: list[int] | None = None):
        """Per-token log-probabilities and ranks [n, C', T] of the continuations after each prompt variant.

        ``prompt_part``: ids [n, P'] or embeddings [n, P', d] (differentiable). Padding slots hold 0 (log-prob)
        and 0 (rank). The rank counts the vocabulary entries scored strictly above the target token.
        """
        conts = list(range(self.C)) if conts is None else conts
        n, p_len = prompt_part.shape[0], prompt_part.shape[1]
        out = self.forward(self.rows(prompt_part, conts), p_len)
        hidden = out.last_hidden_state[:, p_len - 1: p_len - 1 + self.T]  # [n*C', T, d]
        logits = self.lm.logits(hidden).to(self.acc_dtype)
        tgt = torch.stack([torch.nn.functional.pad(self.conts[c], (0, self.T - self.lengths[c])) for c in conts])
        tgt = tgt.repeat(n, 1).unsqueeze(-1)  # [n*C', T, 1]
        chosen = logits.gather(-1, tgt)
        lp = (chosen - torch.logsumexp(logits, dim=-1, keepdim=True)).squeeze(-1)
        rank = (logits > chosen).sum(-1)
        valid = torch.stack([torch.arange(self.T, device=self.device) < self.lengths[c] for c in conts])
        valid = valid.repeat(n, 1)
        lp = torch.where(valid, lp, torch.zeros_like(lp))
        rank = torch.where(valid, rank, torch.zeros_like(rank))
        return lp.view(n, len(conts), self.T), rank.view(n, len(conts), self.T)

    def objectives(self, prompt_part: torch.Tensor) -> torch.Tensor:
        """Objective values [n, K] for each prompt variant."""
        lp, _ = self.token_stats(prompt_part)
        return torch.einsum("nct,kct->nk", lp, self.W)

    # -- backward ------------------------------------------------------------------------------------------------
    def vjp(self, obj: torch.Tensor, wrt: torch.Tensor, ks: list[int], retain: bool) -> torch.Tensor:
        """Gradients [len(ks), *wrt.shape] of each objective ``k`` in ``ks`` (summed over rows) w.r.t. ``wrt``.

        All objectives go through one batched backward (vmap over the graph) where the model allows it, else one
        backward each."""
        t0 = time.perf_counter()
        tokens = wrt.shape[0] * self.C * self.row_len(wrt.shape[1])
        with torch.enable_grad():  # selecting an objective must itself be recorded
            grads = self._grads(obj, wrt, ks, retain)
        self.cost.backward_passes += len(ks)
        self.cost.backward_tokens += len(ks) * tokens
        self.cost.compute_seconds += time.perf_counter() - t0
        return grads

    def _grads(self, obj: torch.Tensor, wrt: torch.Tensor, ks: list[int], retain: bool) -> torch.Tensor:
        rows = obj.shape[0]
        grads = None
        if len(ks) == 1:
            grads = torch.autograd.grad(obj[:, ks[0]].sum(), wrt, retain_graph=retain)[0].unsqueeze(0)
        elif self._batched_vjp:
            go = torch.zeros(len(ks), rows, obj.shape[1], device=obj.device, dtype=obj.dtype)
            go[torch.arange(len(ks)), :, torch.tensor(ks)] = 1.0
            try:
                grads = torch.autograd.grad(obj, wrt, grad_outputs=go, is_grads_batched=True,
                                            retain_graph=True)[0]
            except RuntimeError:  # an op without a batching rule: fall back to one backward per objective
                self._batched_vjp = False
        if grads is None:
            grads = torch.stack([
                torch.autograd.grad(obj[:, k].sum(), wrt, retain_graph=True)[0] for k in ks
            ])
        return grads


class _PromptLayout:
    """Rotary positions and attention of rows that begin with a multimodal prompt (then its continuation)."""

    def __init__(self, ctx: JobContext, prompt_ids: list[int], images: tuple[PromptImage, ...]) -> None:
        self.vision, self.images = ctx.vision, images
        self.P = len(prompt_ids)
        self.structured = self.vision.front.mrope or self.vision.front.bidirectional
        self.rope = self.vision.prompt_rope(prompt_ids, images) if self.vision.front.mrope else None

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        n, L = positions.shape
        rope = keep = None
        if self.rope is not None:
            p, delta = self.rope
            rope = (positions + delta).unsqueeze(0).expand(3, -1, -1).clone()
            rope[:, :, : self.P] = p.unsqueeze(1)
        if self.vision.front.bidirectional:
            causal = torch.arange(L, device=positions.device).unsqueeze(0) <= positions.unsqueeze(-1)
            keep = self.vision.keep(causal, [self.images] * n)
        return rope, keep
