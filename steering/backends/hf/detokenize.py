"""Incremental detokenisation with stop strings, safe for streaming.

Text is decoded a few tokens at a time with a short window of context, so a multi-byte character split
across tokens is never emitted half-way, and the cost per token does not grow with the output. The tail
of the text that could still become a stop string is held back until it is known not to.
"""

from __future__ import annotations

from collections.abc import Sequence

_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = (),
                 include_stop: bool = False, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # decoded text of the generated tokens (truncated at a stop string)
        self.emitted = 0  # characters of self.text already handed out
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop
        self.skip_special = skip_special_tokens
        self.stopped_by: str | None = None

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int, check_stop: bool = True) -> None:
        """Append a token; afterwards ``stopped_by`` tells whether a stop string was completed."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return  # an incomplete character: wait for more tokens
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        start = len(self.text)
        self.text += delta
        if check_stop and self.stop:
            window_from = max(0, start - max(len(s) for s in self.stop) + 1)
            best = None
            for s in self.stop:
                idx = self.text.find(s, window_from)
                if idx != -1 and (best is None or idx < best[0]):
                    best = (idx, s)
            if best is not None:
                idx, s = best
                self.text = self.text[: idx + len(s)] if self.include_stop else self.text[:idx]
                self.stopped_by = s

    def _held_back(self) -> int:
        if self.stopped_by is not None or not self.stop:
            return 0
        longest = max(len(s) for s in self.stop) - 1
        for k in range(min(longest, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

    def take(self, final: bool = False) -> str:
        """Text not yet handed out; while running, any tail that may still begin a stop string is held back."""
        end = len(self.text) if final else len(self.text) - self._held_back()
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
