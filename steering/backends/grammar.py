"""Structured output with llguidance, shared by the backends: a request's :class:`StructuredOutput` becomes an
llguidance grammar, compiled once per spec for one tokenizer (a bounded cache of compiled matchers), checked
before anything runs, and, on the Hugging Face backend, a matcher per row that masks the logits at every step.

JSON (a schema, or any object) is compact: no whitespace outside strings, ``,`` and ``:`` as separators (vLLM's
``disable_any_whitespace``), so small models cannot wander into endless whitespace. ``grammar`` takes Lark or
GBNF (as vLLM's guidance backend), ``choice`` one of the strings exactly.

A bad spec is an :class:`InvalidRequestError` with ``param="response_format"``, raised by
:meth:`GrammarCompiler.check` (the backends call it in ``submit``; compiling can take a while for a large schema,
so a server may call it first on a worker thread: the result is cached).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch

from steering.errors import InvalidRequestError
from steering.sampling import StructuredOutput

PARAM = "response_format"
JSON_OPTIONS = {"whitespace_flexible": False}
"""llguidance's JSON options: compact output (vLLM: ``disable_any_whitespace=True``)."""


def grammar_text(spec: StructuredOutput) -> str:
    """The llguidance grammar of ``spec`` (not yet checked: see :meth:`GrammarCompiler.check`)."""
    import llguidance

    kind = spec.kind()
    M = llguidance.LLMatcher
    if kind == "choice" and (not spec.choice or any(not isinstance(c, str) or not c for c in spec.choice)):
        raise InvalidRequestError("invalid choice: give at least one non-empty string", param=PARAM)
    try:
        if kind == "json_schema":
            return M.grammar_from_json_schema(json.dumps(spec.json_schema), defaults=JSON_OPTIONS)  # type: ignore[arg-type]
        if kind == "json_object":
            return M.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)  # type: ignore[arg-type]
        if kind == "regex":
            assert spec.regex is not None
            return M.grammar_from_regex(spec.regex)
        if kind == "choice":
            assert spec.choice is not None
            return llguidance.grammar_from("choice", json.dumps(list(spec.choice)))
        assert spec.grammar is not None
        return llguidance.grammar_from("grammar", spec.grammar)
    except (ValueError, TypeError) as exc:
        raise InvalidRequestError(f"invalid {kind}: {exc}", param=PARAM) from exc


def spec_key(spec: StructuredOutput) -> str:
    """A canonical text of ``spec`` (the cache key)."""
    kind = spec.kind()
    value = getattr(spec, kind)
    return kind + ":" + json.dumps(list(value) if isinstance(value, tuple) else value, sort_keys=True, default=repr)


class GrammarCompiler:
    """Compiles structured-output specs for one tokenizer. Thread-safe; the llguidance tokenizer is built once
    (about a second for a large vocabulary), on first use or by :meth:`warm`."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int], cache_size: int = 64) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = max(int(vocab_size), len(tokenizer))
        """Width of the masks: the model's logits, or the tokenizer's vocabulary if that is larger."""
        self._eos = sorted(set(eos_ids)) or None
        self._ll: Any = None
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Any] = OrderedDict()
        """Spec key -> a compiled, never advanced matcher (copied for each request) or the error message."""
        self._executor: Any = None

    @property
    def tokenizer(self) -> Any:
        """The ``llguidance.LLTokenizer`` (built on first use)."""
        with self._build_lock:
            if self._ll is None:
                import llguidance.hf

                self._ll = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size,
                                                        eos_token=self._eos)
            return self._ll

    def warm(self) -> None:
        """Build the tokenizer on a thread of its own, so the first structured request does not wait for it."""
        threading.Thread(target=lambda: self.tokenizer, name="steerserve-llg-tokenizer", daemon=True).start()

    def check(self, spec: StructuredOutput) -> None:
        """Compile ``spec`` (or find it compiled); raise InvalidRequestError if it is not a valid grammar."""
        self._template(spec)

    def matcher(self, spec: StructuredOutput) -> Any:
        """A fresh ``llguidance.LLMatcher`` for one request (raises InvalidRequestError for a bad spec)."""
        template = self._template(spec)
        with self._lock:
            return template.deep_copy()

    def _template(self, spec: StructuredOutput) -> Any:
        key = spec_key(spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
        if hit is None:
            hit = self._compile(spec)
            with self._lock:
                self._cache[key] = hit
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        if isinstance(hit, str):
            raise InvalidRequestError(hit, param=PARAM)
        return hit

    def _compile(self, spec: StructuredOutput) -> Any:
        """A compiled matcher, or the error message (a bad spec is cached too)."""
        import llguidance

        try:
            text = grammar_text(spec)
        except InvalidRequestError as exc:
            return exc.message
        try:
            tokenizer = self.tokenizer
        except ValueError as exc:  # llguidance takes fast (Rust) tokenizers only
            return f"this model's tokenizer does not support structured output: {exc}"
        m = llguidance.LLMatcher(tokenizer, text, log_level=0)
        if m.is_error():
            return f"invalid {spec.kind()}: {m.get_error().strip() or 'it does not compile'}"
        return m

    # -- masks (inference thread) -------------------------------------------------------------------------------
    def allowed(self, matchers: list[Any], vocab: int, device: torch.device) -> torch.Tensor:
        """Which tokens each matcher allows next: bool [len(matchers), vocab], on ``device``."""
        import llguidance

        words = (self.vocab_size + 31) // 32
        bits = torch.zeros(len(matchers), words, dtype=torch.int32)
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bits.data_ptr(),
                                               words * 4, len(matchers))
        return unpack_bitmask(bits, vocab).to(device)


def unpack_bitmask(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """llguidance's bitmask (int32 [n, words], token t is bit t % 32 of word t // 32) as bool [n, vocab]; tokens
    beyond the mask are not allowed."""
    shifts = torch.arange(32, dtype=torch.int32)
    flat = ((bits.unsqueeze(-1) >> shifts) & 1).bool().reshape(bits.shape[0], -1)
    if flat.shape[1] >= vocab:
        return flat[:, :vocab]
    return torch.cat([flat, flat.new_zeros(bits.shape[0], vocab - flat.shape[1])], dim=1)
