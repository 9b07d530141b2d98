"""Bounds on the work one request may ask for, shared by every backend and checked before anything runs.

A request over a bound is refused with an InvalidRequestError naming the field, so that no client can make the
server (or the rows batched beside it) do unbounded work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from steering.errors import InvalidRequestError
from steering.multimodal import ImageLimits


@dataclass(frozen=True)
class RequestLimits:
    max_prompt_chars: int = 1_000_000
    """Characters of prompt text (all messages together) tokenized for one request."""
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    """Characters of one stop string (each is searched for in every new piece of text)."""
    max_stop_token_ids: int = 64
    images: ImageLimits = field(default_factory=ImageLimits)
    """What a request's images may be (count, bytes, pixels, formats, readable directories)."""

    def check_text(self, texts: Sequence[str], param: str) -> None:
        total = sum(len(t) for t in texts)
        if total > self.max_prompt_chars:
            raise InvalidRequestError(f"the prompt has {total} characters; this server takes at most "
                                      f"{self.max_prompt_chars}", param=param)

    def check_stops(self, stop: Sequence[str], stop_token_ids: Sequence[int]) -> None:
        if len(stop) > self.max_stop_strings:
            raise InvalidRequestError(f"{len(stop)} stop strings; at most {self.max_stop_strings}", param="stop")
        longest = max((len(s) for s in stop), default=0)
        if longest > self.max_stop_chars:
            raise InvalidRequestError(f"a stop string has {longest} characters; at most {self.max_stop_chars}",
                                      param="stop")
        if len(stop_token_ids) > self.max_stop_token_ids:
            raise InvalidRequestError(f"{len(stop_token_ids)} stop token ids; at most {self.max_stop_token_ids}",
                                      param="stop_token_ids")
