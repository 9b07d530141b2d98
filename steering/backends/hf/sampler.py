"""The batched sampler of the Hugging Face backend: one token per row, each row with its own parameters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from steering.sampling import SamplingParams, TokenLogprob


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        cum = torch.cumsum(probs, dim=-1)
        remove = cum - probs > top_p  # keep the smallest set whose mass reaches top_p (always >= 1 token)
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


@dataclass
class RowSampling:
    """What the sampler needs to know about one row."""

    params: SamplingParams
    generated: list[int]
    generator: torch.Generator | None
    banned: list[int]  # token ids forbidden at this step (EOS/stop ids before min_tokens)


def sample(logits: torch.Tensor, rows: Sequence[RowSampling]) -> list[tuple[int, TokenLogprob | None] | Exception]:
    """Sample one token per row from ``logits`` [n, vocab].

    Returns, per row, (token id, logprob info or None) or the exception raised by that row's logits
    processors (so one bad request fails alone). Log-probabilities are those of the model's raw
    distribution, before temperature and filtering.
    """
    logits = logits.float()
    need_lp = any(r.params.logprobs for r in rows)
    raw_lp = torch.log_softmax(logits, dim=-1) if need_lp else None
    plain = [i for i, r in enumerate(rows) if r.params.greedy and not r.params.logits_processors and not r.banned]
    if len(plain) == len(rows):
        greedy_tokens = torch.argmax(logits, dim=-1).tolist()
    else:
        greedy_tokens = torch.argmax(logits[plain], dim=-1).tolist() if plain else []
    chosen: dict[int, int] = dict(zip(plain, greedy_tokens))
    results: list = [None] * len(rows)
    for i, row in enumerate(rows):
        if i in chosen:
            continue
        try:
            lg = logits[i]
            for proc in row.params.logits_processors:
                lg = proc(list(row.generated), lg)
            if row.banned:
                lg = lg.clone()
                lg[row.banned] = float("-inf")
            p = row.params
            if p.greedy:
                chosen[i] = int(torch.argmax(lg))
            else:
                lg = _filter_top_k_top_p(lg / p.temperature, p.top_k, p.top_p)
                probs = torch.softmax(lg, dim=-1)
                chosen[i] = int(torch.multinomial(probs, 1, generator=row.generator))
        except Exception as exc:  # noqa: BLE001 - a user callback failed: fail this row only
            results[i] = exc
    for i, row in enumerate(rows):
        if results[i] is not None:
            continue
        tok = chosen[i]
        info = None
        if row.params.logprobs:
            assert raw_lp is not None
            lp = raw_lp[i]
            top: list[tuple[int, float]] = []
            if row.params.top_logprobs:
                vals, idx = torch.topk(lp, row.params.top_logprobs)
                top = list(zip(idx.tolist(), vals.tolist()))
            info = TokenLogprob(tok, float(lp[tok]), top)
        results[i] = (tok, info)
    return results
