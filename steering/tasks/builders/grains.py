"""GrAInS: steering directions from the tokens that integrated gradients says push the model toward the
preferred answer and toward the dispreferred one.

Per example (prompt x, preferred y+, dispreferred y-):

1. Contrastive IG of F = log P(y+ | x) - log P(y- | x) (each answer's summed token log-probabilities) over all
   tokens of x, y+ and y-, packed in one row so x is shared (:mod:`steering.tasks.attribution.packed`). The scores of
   S+ = x + y+ are x's and y+'s; those of S- = x + y- are x's and y-'s.
2. Candidates (``select_from``): by default the answer tokens the other answer does not share (``differing``);
   or every answer token, the prompt's tokens, or every token (``sequence``, the reference code's). Special
   tokens are never candidates, nor (``skip_template``) the prompt tokens every example begins and ends with.
   The k most positive candidates of S+ (they raise F) and the k most negative of S- (they lower it); only
   tokens with a score of that sign qualify.
3. Each set replaced (``replacement``: a token, by default pad/EOS; removed, ``delete``; or the IG baseline's
   embedding, ``baseline``); at every layer, the last token's state of the original minus that of the masked
   sequence: delta+ (from S+) and delta- (from S-).
4. Over the examples, per layer: u = the mean delta (``mean``, default), or the deltas' first principal
   component, its sign aligned with their mean (``pca``); v = u+ - u- (``both``) or u+ (``pos``).

Why these defaults (docs/experiments.md, "GrAInS: the defect"): with every token a candidate, the tokens the
attribution ranks highest are the chat template's, the system prompt's and the ones both answers share (an
answer token's score is its share of its own answer's log-likelihood, which is large for any fluent token), so
both polarities mask much the same tokens that carry no preference; and the first principal component of the
centred deltas explains 11-30% of their variance and is nearly unrelated to their mean. With the reference's
choices the sentiment vector moved VADER the wrong way. When the two answers differ only in the masked tokens,
the masked sequences are identical and, with ``mean``, v is exactly the mean last-token contrast h(S+) - h(S-).

Where this deliberately differs from the public reference code (duykhuongnguyen/GrAInS): answers are scored by
their summed log-probabilities (the reference reads one next-token logit, off by one); candidates and
aggregation (above; the reference's are ``sequence`` without ``skip_template``, and ``pca``); the PCA sign is
aligned with the mean delta (the reference's signs are arbitrary, so u+ - u- could be meaningless); each polarity uses
its own sequence (the reference masks both sequences for each polarity and recomputes attribution for each);
the prompt is attributed once, shared by both answers; steering preserves each token's norm over the hidden
dimension (the reference normalises over the sequence axis); states are read from the decoder layers' outputs
(the reference's last layer is read after the final norm); building and evaluation data are kept apart by the
caller (the reference evaluates on its own building rows).
"""

from __future__ import annotations

import bisect
import difflib
from dataclasses import replace
from typing import Literal

import torch
from pydantic import Field

from steering.engine.jobs import JobContext, scaled
from steering.errors import InvalidRequestError
from steering.multimodal import PromptImage, image_positions
from steering.tasks import activations
from steering.tasks.attribution.gradients import IntegrationMethod
from steering.tasks.attribution.packed import Precision, cached_integrated_gradients, resolve_precision
from steering.tasks.builders.registry import (
    Builder,
    BuilderParams,
    Directions,
    Encoded,
    principal_direction,
    register,
)
from steering.tasks.packing import Segment, answer_rows

Candidates = Literal["differing", "answer", "prompt", "sequence"]


class GrainsParams(BuilderParams):
    k: int = Field(10, ge=1, le=1024, description="tokens masked per sequence and polarity")
    n_steps: int = Field(20, ge=1, le=512, description="integrated-gradients quadrature points")
    integration: IntegrationMethod = "gausslegendre"
    baseline: Literal["zeros", "pad", "eos"] = "zeros"
    precision: Precision = Field(
        "auto", description="integrated gradients in the model's own dtype (model); with bfloat16 matrix products "
                            "and float32 accumulation (bfloat16), except the path points nearest the zero baseline, "
                            "which stay in float32 because rounding there re-rolls the token choice (and, on CPUs, "
                            "attention); or bfloat16 where the hardware runs it natively and the model is float32, "
                            "else the model's dtype (auto: on 200 TruthfulQA triples of the default model within "
                            "cosine 0.999 of float32's vector at every layer, in half the time)")
    replacement: Literal["pad", "eos", "unk", "delete", "baseline"] | int = Field(
        "pad", description="what takes the chosen tokens' place: a token (pad, i.e. EOS when there is none; eos; "
                           "unk; or an id), nothing (delete: the tokens are removed), or the integrated-gradients "
                           "baseline embedding (baseline)")
    aggregate: Literal["mean", "pca"] = Field(
        "mean", description="per polarity, the mean delta (mean) or the deltas' first principal component, "
                            "sign-aligned with their mean (pca, the reference code's)")
    mode: Literal["both", "pos"] = "both"
    select_from: Candidates = Field(
        "differing", description="candidate tokens: the answer tokens the other answer does not share (differing), "
                                 "every answer token (answer), the prompt's (prompt), or every token of prompt and "
                                 "answer (sequence, the reference code's)")
    skip_template: bool = Field(
        True, description="prompt candidates exclude the template: the tokens every example's prompt begins and "
                          "ends with (chat markup, system prompt, 'Q:'/'A:'); needs two or more examples")
    image_tokens: bool = Field(
        True, description="a vision-language example's image tokens are candidates too, whatever select_from says "
                          "(each polarity's top k is chosen across text and image tokens); a chosen image token is "
                          "masked by replacing its merged embedding with the integrated-gradients baseline's")


def select(scores: list[float], candidates: list[bool], k: int, negative: bool) -> list[int]:
    """The k positions with the largest (or most negative) scores of that sign among the candidates."""
    picked = [i for i, s in enumerate(scores) if candidates[i] and (s < 0 if negative else s > 0)]
    picked.sort(key=lambda i: (scores[i] if negative else -scores[i], i))
    return sorted(picked[:k])


def masked(ids: list[int], positions: list[int], replacement: int | None) -> list[int]:
    """``ids`` with ``positions`` replaced by ``replacement``, or removed when it is None."""
    if replacement is None:
        drop = set(positions)
        return [t for i, t in enumerate(ids) if i not in drop]
    out = list(ids)
    for p in positions:
        out[p] = replacement
    return out


def template_affixes(prompts: list[list[int]]) -> tuple[int, int]:
    """Lengths of the token prefix and suffix every prompt shares (the template around the content: chat
    markup and system prompt, 'Q:' and 'A:'); (0, 0) for fewer than two prompts. They never overlap."""
    if len(prompts) < 2:
        return 0, 0
    shortest = min(len(p) for p in prompts)
    pre = 0
    while pre < shortest and len({p[pre] for p in prompts}) == 1:
        pre += 1
    suf = 0
    while suf < shortest - pre and len({p[-1 - suf] for p in prompts}) == 1:
        suf += 1
    return pre, suf


def unshared(a: list[int], b: list[int]) -> list[bool]:
    """Per token of ``a``: not part of a longest matching run with ``b`` (the tokens where the two differ)."""
    out = [True] * len(a)
    for blk in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_matching_blocks():
        out[blk.a:blk.a + blk.size] = [False] * blk.size
    return out


def candidate_mask(prompt: list[int], answer: list[int], other: list[int], params: GrainsParams,
                   special: set[int], template: tuple[int, int], images: frozenset[int] = frozenset()) -> list[bool]:
    """Which tokens of prompt + answer may be chosen (``images``: the prompt's image token positions)."""
    P, (pre, suf) = len(prompt), template
    how = params.select_from
    if how in ("sequence", "prompt"):
        in_prompt = [(not params.skip_template) or pre <= i < P - suf for i in range(P)]
    else:
        in_prompt = [False] * P
    if how == "prompt":
        in_answer = [False] * len(answer)
    elif how == "differing":
        in_answer = unshared(answer, other)
    else:
        in_answer = [True] * len(answer)
    out = [ok and t not in special for ok, t in zip(in_prompt + in_answer, prompt + answer, strict=True)]
    for i in images:
        out[i] = params.image_tokens
    return out


def masked_images(images: tuple[PromptImage, ...], removed: list[int]) -> tuple[PromptImage, ...]:
    """The images' positions after the tokens at ``removed`` are deleted from the sequence before them."""
    if not removed:
        return images
    gone = sorted(removed)
    return tuple(replace(im, positions=tuple(p - bisect.bisect_left(gone, p) for p in im.positions))
                 for im in images)


def baseline_embedding(lm, baseline: str) -> torch.Tensor:
    """The integrated-gradients baseline's embedding [hidden]: zeros, or the pad / EOS token's."""
    emb = lm.model.get_input_embeddings()
    if baseline == "zeros":
        return torch.zeros(lm.hidden_size, device=lm.device, dtype=emb.weight.dtype)
    tok = lm.pad_id if baseline == "pad" else lm.tokenizer.eos_token_id
    return emb(torch.tensor([int(tok)], device=lm.device))[0].detach()


def replacement_id(lm, choice) -> int | None:
    """The token id written over the chosen tokens; None for ``delete`` and ``baseline`` (no token)."""
    if isinstance(choice, int):
        return choice
    if choice in ("delete", "baseline"):
        return None
    tokenizer = lm.tokenizer
    tok = {"pad": lm.pad_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id}[choice]
    if tok is None:
        raise InvalidRequestError(f"the tokenizer has no {choice} token; give a token id as 'replacement'")
    return int(tok)


@register
class Grains(Builder):
    name = "grains"
    Params = GrainsParams
    summary = ("contrastive integrated gradients picks the top-k tokens toward each answer among those where the "
               "answers differ; masking them gives hidden-state deltas whose mean (or principal) directions make "
               "the vector")

    @classmethod
    def cost(cls, data: list[Encoded], params: GrainsParams) -> float:
        tokens = super().cost(data, params)
        return tokens * (3 * params.n_steps + 2)  # IG: a forward and a backward per point; then the states

    def run(self, ctx: JobContext, data: list[Encoded], layers: list[int], params: GrainsParams):
        lm = ctx.lm
        special = lm.special_token_ids
        rep = replacement_id(lm, params.replacement)
        rows = [answer_rows(e.prompt, [e.preferred, e.dispreferred], e.images) for e in data]
        image_sets = [frozenset(image_positions(e.images)) for e in data]
        split = 3 * params.n_steps / (3 * params.n_steps + 2)  # progress share of IG (see cost())
        # Scores are cached per example: builds that differ only after attribution (k, mode, aggregate,
        # candidates, replacement) reuse them.
        scores = yield from scaled(cached_integrated_gradients(
            ctx, rows, [[0.0, 1.0, -1.0]] * len(data), params.n_steps, params.integration, params.baseline,
            precision=params.precision), 0.0, split)
        # skipped when params.skip_template; image tokens are content (unique per example), never template
        template = template_affixes([[-1 - k if i in img else t for i, t in enumerate(e.prompt)]
                                     for k, (e, img) in enumerate(zip(data, image_sets, strict=True))])
        # Selection, then one activation pass: the originals packed as [x, y+, y-] (last tokens of y+ and y-),
        # and the two masked sequences side by side as separate roots.
        act_rows, groups, picks = [], [], []
        swaps: list[list[int]] = []
        for e, row, s, img in zip(data, rows, scores, image_sets, strict=True):
            P, A = len(e.prompt), len(e.preferred)
            seq_pos, seq_neg = e.prompt + e.preferred, e.prompt + e.dispreferred
            s_pos = s[: P + A].tolist()
            s_neg = s[:P].tolist() + s[P + A:].tolist()
            pos = select(s_pos, candidate_mask(e.prompt, e.preferred, e.dispreferred, params, special, template, img),
                         params.k, negative=False)
            neg = select(s_neg, candidate_mask(e.prompt, e.dispreferred, e.preferred, params, special, template, img),
                         params.k, negative=True)
            picks.append((pos, neg))
            act_rows.append(row)
            groups.append([[P + A - 1], [P + A + len(e.dispreferred) - 1]])
            swaps.append([])
            if params.replacement == "baseline":  # the ids stay; their embeddings become the baseline's
                m_pos, m_neg = seq_pos, seq_neg
                i_pos = i_neg = e.images
                swaps.append(pos + [len(seq_pos) + q for q in neg])
            else:  # text tokens replaced (or deleted); image tokens always take the baseline's embedding
                t_pos, t_neg = [i for i in pos if i not in img], [i for i in neg if i not in img]
                m_pos, m_neg = masked(seq_pos, t_pos, rep), masked(seq_neg, t_neg, rep)
                gone_pos, gone_neg = (t_pos, t_neg) if rep is None else ([], [])
                i_pos, i_neg = masked_images(e.images, gone_pos), masked_images(e.images, gone_neg)
                swaps.append([i - bisect.bisect_left(gone_pos, i) for i in pos if i in img]
                             + [len(m_pos) + i - bisect.bisect_left(gone_neg, i) for i in neg if i in img])
            act_rows.append([Segment(m_pos, images=i_pos), Segment(m_neg, images=i_neg)])
            groups.append([[len(m_pos) - 1], [len(m_pos) + len(m_neg) - 1]])
        swap = (swaps, baseline_embedding(lm, params.baseline)) if any(swaps) else None
        states = yield from scaled(activations.collect(ctx, act_rows, groups, layers, replace=swap), split, 1.0)
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

        def where(i: int, P: int, img: frozenset[int] = frozenset()) -> str:
            return "image" if i in img else "answer" if i >= P else \
                "template" if i < template[0] or i >= P - template[1] else "prompt"

        info = {
            "precision": resolve_precision(lm, params.precision),
            "examples_with_positive_tokens": len(use_pos), "examples_with_negative_tokens": len(use_neg),
            "mean_tokens_masked": {"pos": sum(len(p) for p, _ in picks) / n, "neg": sum(len(q) for _, q in picks) / n},
            "replacement_token": ({"id": rep, "text": tok.decode([rep])} if rep is not None
                                  else {"id": None, "text": params.replacement}),
            "template_tokens": {"prefix": template[0], "suffix": template[1]},
            "chosen_parts": {pol: {part: sum(where(i, len(e.prompt), img) == part
                                             for e, pk, img in zip(data, picks, image_sets, strict=True)
                                             for i in pk[j]) for part in ("template", "prompt", "image", "answer")}
                             for j, pol in enumerate(("pos", "neg"))},
            "selections": [
                {"pos": [tok.decode([(e.prompt + e.preferred)[i]]) for i in p],
                 "neg": [tok.decode([(e.prompt + e.dispreferred)[i]]) for i in q],
                 "pos_at": [[i, where(i, len(e.prompt), img)] for i in p],
                 "neg_at": [[i, where(i, len(e.prompt), img)] for i in q]}
                for e, (p, q), img in list(zip(data, picks, image_sets, strict=True))[:20]
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
