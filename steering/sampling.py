"""Per-request sampling parameters (the batched sampler is the backend's)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from steering.errors import InvalidRequestError

LogitsProcessor = Callable[[list[int], "torch.Tensor"], "torch.Tensor"]
"""(generated token ids so far, logits [vocab]) -> logits. Runs in the inference thread."""

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0
MIN_REPETITION_PENALTY = 0.01
"""Dividing logits by a tinier penalty overflows float32 (as a tinier temperature would)."""
GREEDY_BELOW = 1e-5
"""Temperatures below this sample greedily (as in vLLM): dividing logits by a tinier one overflows float32."""


@dataclass(frozen=True)
class StructuredOutput:
    """Constrained decoding: exactly one of these is set. The backend compiles it with a grammar library and
    masks, at every step, the tokens that cannot continue a valid output (EOS only once the output is complete).
    The same fields as vLLM's ``StructuredOutputsParams``."""

    json_schema: dict[str, Any] | None = None
    json_object: bool = False
    """Any JSON object."""
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    """EBNF (GBNF) grammar."""

    def kind(self) -> str:
        set_ = [k for k, v in (("json_schema", self.json_schema), ("json_object", self.json_object or None),
                               ("regex", self.regex), ("choice", self.choice), ("grammar", self.grammar))
                if v is not None]
        if len(set_) != 1:
            raise InvalidRequestError("a structured output sets exactly one of json_schema, json_object, regex, "
                                      f"choice, grammar (got {', '.join(set_) or 'none'})", param="response_format")
        return set_[0]


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
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was already generated (OpenAI's definition)."""
    presence_penalty: float = 0.0
    """Subtracted from a token's logit if it was generated at least once."""
    repetition_penalty: float = 1.0
    """CTRL/HF/vLLM: logits of tokens seen in the prompt or the output are divided by it (multiplied if < 0)."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id -> value added to its logit before sampling, in [-100, 100]."""
    structured: StructuredOutput | None = None
    prompt_logprobs: int | None = None
    """None: none. 0: the log-probability of every prompt token (after the first) given what precedes it;
    k > 0: also the k most likely tokens at each prompt position. Steering applies, as in generation."""

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    def validate(self, vocab_size: int | None = None) -> None:
        def bad(msg: str, param: str) -> None:
            raise InvalidRequestError(msg, param=param)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            bad("max_tokens must be an integer >= 0", "max_tokens")
        if self.max_tokens == 0 and self.prompt_logprobs is None:
            bad("max_tokens 0 generates nothing: it is only for scoring a prompt (prompt logprobs / echo)",
                "max_tokens")
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
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
            bad(f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}]", "prompt_logprobs")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if not math.isfinite(v) or not -2 <= v <= 2:
                bad(f"{name} must be in [-2, 2]", name)
        if not math.isfinite(self.repetition_penalty) or not MIN_REPETITION_PENALTY <= self.repetition_penalty <= 10:
            bad(f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, 10]", "repetition_penalty")
        for tok, b in self.logit_bias.items():
            if vocab_size is not None and not 0 <= tok < vocab_size:
                bad(f"logit_bias: token id {tok} is not in [0, {vocab_size})", "logit_bias")
            if not math.isfinite(b) or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS:
                bad(f"logit_bias: values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]", "logit_bias")
        if self.structured is not None:
            self.structured.kind()

    @property
    def penalized(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first
