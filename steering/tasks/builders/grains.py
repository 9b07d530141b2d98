"""GrAInS: steering directions from the tokens that integrated gradients says push the model toward the
preferred answer and toward the dispreferred one.

Per example (prompt x, preferred y+, dispreferred y-):

1. Contrastive IG of F = log P(y+ | x) - log P(y- | x) (each answer's summed token log-probabilities) over all
   tokens of x, y+ and y-, packed in one row so x is shared (:mod:`steering.tasks.attribution.packed`). The scores of
   S+ = x + y+ are x's and y+'s; those of S- = x + y- are x's and y-'s.
2. The k most positive tokens of S+ (they raise F) and the k most negative of S- (they lower it), special
   tokens never chosen; only tokens with a score of that sign qualify.
3. Each set replaced by the replacement token; at every layer, the last token's state of the original minus
   that of the masked sequence: delta+ (from S+) and delta- (from S-).
4. Over the examples, per layer: u = first principal component of the deltas, its sign aligned with their mean
   (``pca``), or their mean (``mean``); v = u+ - u- (``both``) or u+ (``pos``).

Where this deliberately differs from the public reference code (duykhuongnguyen/GrAInS): answers are scored by
their summed log-probabilities (the reference reads one next-token logit, off by one); the PCA sign is aligned
with the mean delta (the reference's signs are arbitrary, so u+ - u- could be meaningless); each polarity uses
its own sequence (the reference masks both sequences for each polarity and recomputes attribution for each);
the prompt is attributed once, shared by both answers; steering preserves each token's norm over the hidden
dimension (the reference normalises over the sequence axis); states are read from the decoder layers' outputs
(the reference's last layer is read after the final norm); building and evaluation data are kept apart by the
caller (the reference evaluates on its own building rows).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from steering.engine.jobs import JobContext, scaled
from steering.errors import InvalidRequestError
from steering.tasks import activations
from steering.tasks.attribution.gradients import IntegrationMethod
from steering.tasks.attribution.packed import integrated_gradients
from steering.tasks.builders.registry import (
    Builder,
    BuilderParams,
    Directions,
    Encoded,
    principal_direction,
    register,
)
from steering.tasks.packing import Segment, answer_rows


class GrainsParams(BuilderParams):
    k: int = Field(10, ge=1, le=1024, description="tokens masked per sequence and polarity")
    n_steps: int = Field(20, ge=1, le=512, description="integrated-gradients quadrature points")
    integration: IntegrationMethod = "gausslegendre"
    baseline: Literal["zeros", "pad", "eos"] = "zeros"
    replacement: Literal["pad", "eos", "unk"] | int = Field(
        "pad", description="token written over the chosen tokens: pad (EOS when there is none), eos, unk, or an id")
    aggregate: Literal["pca", "mean"] = "pca"
    mode: Literal["both", "pos"] = "both"
    select_from: Literal["sequence", "prompt"] = Field(
        "sequence", description="candidates: every non-special token of prompt and answer, or the prompt's only")


def select(scores: list[float], candidates: list[bool], k: int, negative: bool) -> list[int]:
    """The k positions with the largest (or most negative) scores of that sign among the candidates."""
    picked = [i for i, s in enumerate(scores) if candidates[i] and (s < 0 if negative else s > 0)]
    picked.sort(key=lambda i: (scores[i] if negative else -scores[i], i))
    return sorted(picked[:k])


def masked(ids: list[int], positions: list[int], replacement: int) -> list[int]:
    out = list(ids)
    for p in positions:
        out[p] = replacement
    return out


def replacement_id(lm, choice) -> int:
    if isinstance(choice, int):
        return choice
    tokenizer = lm.tokenizer
    tok = {"pad": lm.pad_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id}[choice]
    if tok is None:
        raise InvalidRequestError(f"the tokenizer has no {choice} token; give a token id as 'replacement'")
    return int(tok)


@register
class Grains(Builder):
    name = "grains"
    Params = GrainsParams
    summary = ("contrastive integrated gradients picks the top-k tokens toward each answer; masking them gives "
               "hidden-state deltas whose principal directions make the vector")

    @classmethod
    def cost(cls, data: list[Encoded], params: GrainsParams) -> float:
        tokens = super().cost(data, params)
        return tokens * (3 * params.n_steps + 2)  # IG: a forward and a backward per point; then the states

    def run(self, ctx: JobContext, data: list[Encoded], layers: list[int], params: GrainsParams):
        lm = ctx.lm
        special = lm.special_token_ids
        rep = replacement_id(lm, params.replacement)
        rows = [answer_rows(e.prompt, [e.preferred, e.dispreferred]) for e in data]
        split = 3 * params.n_steps / (3 * params.n_steps + 2)  # progress share of IG (see cost())
        scores = yield from scaled(integrated_gradients(ctx, rows, [[0.0, 1.0, -1.0]] * len(data), params.n_steps,
                                                        params.integration, params.baseline), 0.0, split)
        # Selection, then one activation pass: the originals packed as [x, y+, y-] (last tokens of y+ and y-),
        # and the two masked sequences side by side as separate roots.
        act_rows, groups, picks = [], [], []
        for e, row, s in zip(data, rows, scores):
            P, A = len(e.prompt), len(e.preferred)
            seq_pos, seq_neg = e.prompt + e.preferred, e.prompt + e.dispreferred
            s_pos = s[: P + A].tolist()
            s_neg = s[:P].tolist() + s[P + A:].tolist()
            def cand(ids: list[int], P: int = P) -> list[bool]:
                return [t not in special and (params.select_from == "sequence" or i < P) for i, t in enumerate(ids)]

            pos = select(s_pos, cand(seq_pos), params.k, negative=False)
            neg = select(s_neg, cand(seq_neg), params.k, negative=True)
            picks.append((pos, neg))
            act_rows.append(row)
            groups.append([[P + A - 1], [P + A + len(e.dispreferred) - 1]])
            act_rows.append([Segment(masked(seq_pos, pos, rep)), Segment(masked(seq_neg, neg, rep))])
            groups.append([[len(seq_pos) - 1], [len(seq_pos) + len(seq_neg) - 1]])
        states = yield from scaled(activations.collect(ctx, act_rows, groups, layers), split, 1.0)
        n = len(data)
        use_pos = [i for i, (p, _) in enumerate(picks) if p]
        use_neg = [i for i, (_, q) in enumerate(picks) if q]
        values: dict[int, torch.Tensor] = {}
        stats: dict[str, dict[int, float]] = {"hidden_norm": {}, "explained_variance_pos": {},
                                               "explained_variance_neg": {}}
        for layer in layers:
            h = states[layer].view(n, 4, -1)  # original S+, original S-, masked S+, masked S-
            d_pos = (h[:, 0] - h[:, 2])[use_pos]
            d_neg = (h[:, 1] - h[:, 3])[use_neg]
            stats["hidden_norm"][layer] = float(h[:, 0].norm(dim=-1).mean())
            u_pos, ev_pos = self._aggregate(d_pos, params.aggregate)
            stats["explained_variance_pos"][layer] = ev_pos
            if params.mode == "both":
                u_neg, ev_neg = self._aggregate(d_neg, params.aggregate)
                stats["explained_variance_neg"][layer] = ev_neg
                values[layer] = u_pos - u_neg
            else:
                values[layer] = u_pos
        if params.aggregate == "mean":
            del stats["explained_variance_pos"], stats["explained_variance_neg"]
        elif params.mode == "pos":
            del stats["explained_variance_neg"]
        tok = lm.tokenizer
        info = {
            "examples_with_positive_tokens": len(use_pos), "examples_with_negative_tokens": len(use_neg),
            "mean_tokens_masked": {"pos": sum(len(p) for p, _ in picks) / n, "neg": sum(len(q) for _, q in picks) / n},
            "replacement_token": {"id": rep, "text": tok.decode([rep])},
            "selections": [
                {"pos": [tok.decode([(e.prompt + e.preferred)[i]]) for i in p],
                 "neg": [tok.decode([(e.prompt + e.dispreferred)[i]]) for i in q]}
                for e, (p, q) in list(zip(data, picks))[:20]
            ],
        }
        return Directions(values, info, stats)

    @staticmethod
    def _aggregate(d: torch.Tensor, how: str) -> tuple[torch.Tensor, float]:
        if d.shape[0] == 0:
            raise InvalidRequestError("no example had a token of this polarity to mask; use more examples or a "
                                      "larger k")
        if how == "mean" or d.shape[0] == 1:
            return d.mean(0), 1.0
        return principal_direction(d)
