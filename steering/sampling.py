"""Per-request sampling parameters (the batched sampler is the backend's)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from steering.errors import InvalidRequestError

LogitsProcessor = Callable[[list[int], "torch.Tensor"], "torch.Tensor"]
"""(generated token ids so far, logits [vocab]) -> logits. Runs in the inference thread."""

MAX_TOP_LOGPROBS = 20
GREEDY_BELOW = 1e-5
"""Temperatures below this sample greedily (as in vLLM): dividing logits by a tinier one overflows float32."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) means greedy
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
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    def validate(self, vocab_size: int | None = None) -> None:
        def bad(msg: str, param: str) -> None:
            raise InvalidRequestError(msg, param=param)

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
