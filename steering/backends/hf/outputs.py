"""A running request's state and what it emits: each sampled token becomes a :class:`RequestOutput` delta (text
decoded incrementally, stop strings and token ids checked, length limits applied), handed to the caller's
handle."""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch

from steering.backends.hf.detokenize import IncrementalDetokenizer
from steering.backends.hf.hooks import DeviceApplication
from steering.backends.hf.sampler import RowSampling, make_generator
from steering.engine.handles import RequestHandle
from steering.engine.types import GenerationRequest, RequestMetrics, RequestOutput, SteeringTelemetry
from steering.errors import RequestFailedError
from steering.sampling import TokenLogprob

_uids = itertools.count()


class Sequence:
    """One request in the engine: its tokens so far, sampling state, steering and timing."""

    __slots__ = ("uid", "req", "handle", "params", "tokens", "prompt_len", "generated", "detok", "generator",
                 "apps", "metrics", "banned_until_min", "eos_ids", "finish_reason", "stop_reason", "matcher",
                 "grammar_eos", "prompt_logprobs", "_first_sent", "rope_delta", "telemetry")

    def __init__(self, req: GenerationRequest, handle: RequestHandle, apps: list[DeviceApplication],
                 tokenizer: Any, eos_ids: set[int], device: torch.device, matcher: Any = None) -> None:
        p = req.sampling
        self.uid = next(_uids)  # unique for the engine's lifetime (id() values are reused)
        self.req = req
        self.handle = handle
        self.params = p
        self.tokens = list(req.prompt_token_ids)
        self.prompt_len = len(self.tokens)
        self.generated: list[int] = []
        self.detok = IncrementalDetokenizer(tokenizer, self.tokens, p.stop, p.include_stop_str_in_output,
                                            p.skip_special_tokens)
        self.generator = make_generator(p.seed, device)
        self.apps = apps
        self.metrics = RequestMetrics(arrival_time=time.monotonic())
        handle.metrics = self.metrics
        self.eos_ids = set() if p.ignore_eos else set(eos_ids)
        self.banned_until_min = sorted(self.eos_ids | set(p.stop_token_ids)) if p.min_tokens > 0 else []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.matcher = matcher
        """The structured output's ``llguidance.LLMatcher`` (None: unconstrained), advanced by each token."""
        self.grammar_eos = frozenset(eos_ids)
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        """Set by the engine's prefill when the request asks for them; sent with the first output."""
        self._first_sent = False
        self.rope_delta = 0
        """A multimodal prompt's rotary offset: a later token at position p has rotary position p + delta."""
        self.telemetry = SteeringTelemetry() if apps else None
        """What its steering did so far (the engine adds each forward's measures): sent with the last output."""

    def measured(self, change: float, layer_tokens: list[int]) -> None:
        """Add one forward's measures of this row: the sum of r and the steered tokens per layer."""
        tel = self.telemetry
        if tel is None:
            return
        tel.change_sum += change
        for layer, n in enumerate(layer_tokens):
            if n:
                tel.measured += n
                tel.layer_tokens[layer] = tel.layer_tokens.get(layer, 0) + n

    @property
    def wants_prompt_logprobs(self) -> bool:
        """The request asks for prompt log-probabilities and they are not computed yet."""
        return self.params.prompt_logprobs is not None and self.prompt_logprobs is None

    @property
    def length(self) -> int:
        return len(self.tokens)

    def sampling(self) -> RowSampling:
        banned = self.banned_until_min if len(self.generated) < self.params.min_tokens else []
        return RowSampling(self.params, self.generated, self.generator, banned, self.req.prompt_token_ids)

    def _first(self) -> list[TokenLogprob | None] | None:
        """The prompt log-probabilities, for the first output only."""
        if self._first_sent:
            return None
        self._first_sent = True
        return self.prompt_logprobs

    def append(self, tok: int, lp: TokenLogprob | None, now: float, max_model_len: int) -> None:
        """Take a sampled token: check stops and limits, and emit the delta."""
        self.tokens.append(tok)
        self.generated.append(tok)
        n_gen = len(self.generated)
        m = self.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        p = self.params
        past_min = n_gen >= p.min_tokens
        complete = False
        if self.matcher is not None:
            if not self.matcher.consume_token(tok):
                self.finish("error", error=RequestFailedError(
                    f"the structured output's grammar refused token {tok}: {self.matcher.get_error()}"))
                return
            complete = self.matcher.is_stopped()
        if tok in self.eos_ids and past_min:
            self.finish_reason = "stop"
        elif tok in p.stop_token_ids and past_min:
            self.finish_reason, self.stop_reason = "stop", tok
        elif complete and tok in self.grammar_eos:  # the grammar's end: EOS, even with ignore_eos
            self.finish_reason = "stop"
        else:
            self.detok.add(tok, check_stop=past_min)
            if self.detok.stopped_by is not None:
                self.finish_reason, self.stop_reason = "stop", self.detok.stopped_by
            elif complete:  # the grammar allows nothing more
                self.finish_reason = "stop"
            elif n_gen >= p.max_tokens or self.length >= max_model_len:
                self.finish_reason = "length"
        finished = self.finish_reason is not None
        if finished:
            m.finished_time = now
        self.handle.deliver(RequestOutput(
            request_id=self.req.request_id, token_ids=[tok], text=self.detok.take(final=finished),
            logprobs=[lp] if lp is not None else [], num_prompt_tokens=self.prompt_len,
            num_generated_tokens=n_gen, finished=finished, finish_reason=self.finish_reason,
            stop_reason=self.stop_reason, metrics=m if finished else None, time=now,
            prompt_logprobs=self._first(), steering_telemetry=self.telemetry if finished else None,
        ))

    def finish(self, reason: str, error: Exception | None = None) -> None:
        """End a sequence that did not finish through a token (abort, error)."""
        self.finish_reason = reason
        now = self.metrics.finished_time = time.monotonic()
        self.handle.deliver(RequestOutput(
            request_id=self.req.request_id, token_ids=[], text=self.detok.take(final=True), logprobs=[],
            num_prompt_tokens=self.prompt_len, num_generated_tokens=len(self.generated), finished=True,
            finish_reason=reason, error=error, metrics=self.metrics, time=now, prompt_logprobs=self._first(),
            steering_telemetry=self.telemetry,
        ))
