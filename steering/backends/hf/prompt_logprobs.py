"""Prompt log-probabilities: for every prompt position, the log-probability of the prompt's next token (and the
most likely tokens there), from the final hidden states of the (steered) prefill.

Only the rows that ask pay for the full-vocabulary projection over their prompt, and it runs over a bounded number
of positions at a time. Positions are absolute: :func:`score_range` scores any contiguous range of a prompt, so a
prompt prefilled in several chunks gets exactly the entries of one prefilled at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from steering.backends.hf.loading import LoadedModel
from steering.sampling import TokenLogprob

PROJECTION_ELEMENTS = 1 << 24
"""Most logits (positions x vocabulary) projected at once: 64 MiB of float32."""


def score_range(lm: LoadedModel, hidden: torch.Tensor, prompt: Sequence[int], start: int, top: int,
                max_elements: int = PROJECTION_ELEMENTS) -> list[TokenLogprob]:
    """Score the prompt tokens predicted by ``hidden`` [m, hidden_size], the final hidden states of prompt
    positions ``start .. start+m-1``: position j predicts token ``prompt[j+1]`` (the last prompt position
    predicts nothing and is skipped). ``top``: how many of the most likely tokens to add at each position."""
    stop = min(start + hidden.shape[0], len(prompt) - 1)
    if stop <= start:
        return []
    targets = torch.tensor(prompt[start + 1: stop + 1], device=hidden.device)
    step = max(1, max_elements // max(1, lm.vocab_size))
    out: list[TokenLogprob] = []
    for a in range(0, stop - start, step):
        b = min(a + step, stop - start)
        lp = torch.log_softmax(lm.logits(hidden[a:b]).float(), dim=-1)
        chosen = lp.gather(-1, targets[a:b].unsqueeze(-1)).squeeze(-1).tolist()
        if top:
            vals, idx = torch.topk(lp, top, dim=-1)
            tops = [list(zip(i, v, strict=True)) for i, v in zip(idx.tolist(), vals.tolist(), strict=True)]
        else:
            tops = [[] for _ in chosen]
        out.extend(TokenLogprob(int(t), float(c), tp)
                   for t, c, tp in zip(targets[a:b].tolist(), chosen, tops, strict=True))
    return out


def prompt_logprobs(lm: LoadedModel, hidden: torch.Tensor, prompt: Sequence[int], top: int,
                    max_elements: int = PROJECTION_ELEMENTS) -> list[TokenLogprob | None]:
    """One entry per prompt token from a whole prompt's final hidden states [>= len(prompt), hidden_size]: None
    for the first (nothing precedes it), then each token's log-probability given what precedes it."""
    first: list[TokenLogprob | None] = [None]
    return first + list(score_range(lm, hidden[: len(prompt)], prompt, 0, top, max_elements))
