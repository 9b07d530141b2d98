"""Per-request sampling parameters and the batched sampler."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from steering.errors import RequestValidationError

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]
"""(generated token ids so far, logits [vocab]) -> logits. Runs in the inference thread."""

MAX_TOP_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: bool = False
    top_logprobs: int = 0
    logits_processors: list[LogitsProcessor] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def validate(self, vocab_size: int | None = None) -> None:
        def bad(msg: str, param: str) -> None:
            raise RequestValidationError(msg, param=param)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens must be an integer >= 1", "max_tokens")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens must be an integer >= 0", "min_tokens")
        if self.min_tokens > self.max_tokens:
            bad(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})", "min_tokens")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature must be a finite number >= 0", "temperature")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p must be in (0, 1]", "top_p")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k must be -1, 0 (disabled) or a positive integer", "top_k")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            bad("seed must be an integer in [0, 2^63)", "seed")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop strings must be non-empty strings", "stop")
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            bad(f"stop_token_ids must be token ids in [0, {vocab_size})", "stop_token_ids")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            bad(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]", "top_logprobs")


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


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
            lp = raw_lp[i]
            top: list[tuple[int, float]] = []
            if row.params.top_logprobs:
                vals, idx = torch.topk(lp, row.params.top_logprobs)
                top = list(zip(idx.tolist(), vals.tolist()))
            info = TokenLogprob(tok, float(lp[tok]), top)
        results[i] = (tok, info)
    return results
