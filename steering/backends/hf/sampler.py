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
    prompt: Sequence[int] = ()
    """The prompt's token ids (the repetition penalty counts them)."""
    allowed: torch.Tensor | None = None
    """bool [vocab]: the tokens a structured output's grammar allows at this step (None: unconstrained)."""

    @property
    def plain(self) -> bool:
        """Nothing changes this row's logits before sampling."""
        p = self.params
        return not (p.logits_processors or self.banned or p.penalized or self.allowed is not None)


def sample(logits: torch.Tensor, rows: Sequence[RowSampling]) -> list[tuple[int, TokenLogprob | None] | Exception]:
    """Sample one token per row from ``logits`` [n, vocab].

    Each row's logits go, in vLLM's order, through its logits processors, the bans of ``min_tokens``, its
    ``logit_bias``, its penalties (repetition, then frequency and presence) and its grammar's mask, then
    temperature, top-k and top-p. Rows that need none of it take the greedy fast path together; penalties are
    computed for all penalised rows at once.

    Returns, per row, (token id, logprob info or None) or the exception that failed that row (its logits
    processors, or a grammar that allows nothing), so one bad request fails alone. Log-probabilities are those
    of the model's raw distribution, before any of the above.
    """
    logits = logits.float()
    need_lp = any(r.params.logprobs for r in rows)
    raw_lp = torch.log_softmax(logits, dim=-1) if need_lp else None
    results: list = [None] * len(rows)
    work = logits
    if not all(r.plain for r in rows):
        work = _adjusted(logits, rows, results)
    chosen = _greedy(work, rows, results)
    for i, row in enumerate(rows):
        if i in chosen or results[i] is not None:
            continue
        p = row.params
        try:
            lg = _filter_top_k_top_p(work[i] / p.temperature, p.top_k, p.top_p)
            chosen[i] = int(torch.multinomial(torch.softmax(lg, dim=-1), 1, generator=row.generator))
        except RuntimeError as exc:  # e.g. a processor left no finite logit: this row fails alone
            results[i] = exc
    for i, row in enumerate(rows):
        if results[i] is None:
            results[i] = (chosen[i], _logprob(raw_lp, i, chosen[i], row.params))
    return results


def _greedy(logits: torch.Tensor, rows: Sequence[RowSampling], results: list) -> dict[int, int]:
    """Argmax of every greedy row that has not failed, in one call."""
    idx = [i for i, r in enumerate(rows) if r.params.greedy and results[i] is None]
    if not idx:
        return {}
    tokens = torch.argmax(logits if len(idx) == len(rows) else logits[idx], dim=-1).tolist()
    return dict(zip(idx, tokens, strict=True))


def _logprob(raw_lp: torch.Tensor | None, i: int, tok: int, p: SamplingParams) -> TokenLogprob | None:
    if not p.logprobs:
        return None
    assert raw_lp is not None
    lp = raw_lp[i]
    top: list[tuple[int, float]] = []
    if p.top_logprobs:
        vals, idx = torch.topk(lp, p.top_logprobs)
        top = list(zip(idx.tolist(), vals.tolist(), strict=True))
    return TokenLogprob(tok, float(lp[tok]), top)


def _adjusted(logits: torch.Tensor, rows: Sequence[RowSampling], results: list) -> torch.Tensor:
    """A copy of ``logits`` with every row's processors, bans, bias, penalties and grammar mask applied; a row
    that fails gets its exception in ``results``."""
    out = logits.clone()
    for i, row in enumerate(rows):
        if not row.params.logits_processors:
            continue
        try:
            lg = out[i]
            for proc in row.params.logits_processors:
                lg = proc(list(row.generated), lg)
            out[i] = lg
        except Exception as exc:  # noqa: BLE001 - a user callback failed: fail this row only
            results[i] = exc
    for i, row in enumerate(rows):
        if row.banned and row.allowed is None:
            out[i, row.banned] = float("-inf")
    penalize(out, rows)
    for i, row in enumerate(rows):
        if row.allowed is not None and results[i] is None:
            results[i] = _constrain(out, i, row)
    return out


def _constrain(logits: torch.Tensor, i: int, row: RowSampling) -> Exception | None:
    """Keep only what the row's grammar allows (and ``min_tokens`` does not ban, unless the grammar allows
    nothing else: the grammar wins)."""
    assert row.allowed is not None
    allowed = row.allowed
    if row.banned:
        unbanned = allowed.clone()
        unbanned[row.banned] = False
        if bool(unbanned.any()):
            allowed = unbanned
    if not bool(allowed.any()):
        return RuntimeError("the structured output's grammar allows no token here")
    logits[i].masked_fill_(~allowed, float("-inf"))
    return None


def penalize(logits: torch.Tensor, rows: Sequence[RowSampling]) -> None:
    """Apply, in place and for all penalised rows at once, ``logit_bias`` and then vLLM's penalties: the
    repetition penalty over tokens of the prompt or the output (a positive logit divided by it, a negative one
    multiplied), then ``frequency_penalty`` times each token's count in the output and ``presence_penalty``
    once for each token the output holds."""
    idx = [i for i, r in enumerate(rows) if r.params.penalized]
    if not idx:
        return
    dev, vocab = logits.device, logits.shape[-1]
    params = [rows[i].params for i in idx]
    sub = logits[idx]
    _add_bias(sub, params)
    counts = _counts([rows[i].generated for i in idx], vocab, dev)
    rep = torch.tensor([p.repetition_penalty for p in params], device=dev).unsqueeze(-1)
    if bool((rep != 1.0).any()):
        seen = (counts > 0) | (_counts([rows[i].prompt for i in idx], vocab, dev) > 0)
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    freq = torch.tensor([p.frequency_penalty for p in params], device=dev).unsqueeze(-1)
    pres = torch.tensor([p.presence_penalty for p in params], device=dev).unsqueeze(-1)
    sub = sub - freq * counts - pres * (counts > 0).float()
    logits[idx] = sub


def _add_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    rows = [r for r, p in enumerate(params) for _ in p.logit_bias]
    if not rows:
        return
    toks = [t for p in params for t in p.logit_bias]
    vals = [v for p in params for v in p.logit_bias.values()]
    dev = logits.device
    logits.index_put_((torch.tensor(rows, device=dev), torch.tensor(toks, device=dev)),
                      torch.tensor(vals, dtype=logits.dtype, device=dev), accumulate=True)


def _counts(token_lists: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each list: float [len(token_lists), vocab]."""
    counts = torch.zeros(len(token_lists), vocab, device=device)
    longest = max((len(t) for t in token_lists), default=0)
    if longest:
        ids = torch.zeros(len(token_lists), longest, dtype=torch.long)
        valid = torch.zeros(len(token_lists), longest)
        for r, toks in enumerate(token_lists):
            ids[r, : len(toks)] = torch.as_tensor(list(toks), dtype=torch.long)
            valid[r, : len(toks)] = 1.0
        counts.scatter_add_(1, ids.to(device), valid.to(device))
    return counts
