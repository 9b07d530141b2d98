"""``/tokenize`` and ``/detokenize``: the same encoding as chat and completions (roles mapped alike)."""

from __future__ import annotations

from server.protocol.generation import chat_messages
from server.protocol.models import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from server.serving.models import ModelService
from server.serving.threads import tokenize
from steering.errors import InvalidRequestError
from steering.inputs import Inputs
from steering.limits import RequestLimits
from steering.multimodal import load_message_images


class TokenizerService:
    def __init__(self, inputs: Inputs, models: ModelService, limits: RequestLimits) -> None:
        self.inputs = inputs
        self.models = models
        self.limits = limits

    async def tokenize(self, req: TokenizeRequest) -> bytes:
        """The response as JSON bytes: a long prompt's ids and token strings are built and serialised on the
        tokenizing thread too, not on the event loop."""
        self.models.check(req.model)
        texts = [req.prompt] if req.prompt is not None else [m.text() for m in req.messages or []]
        self.limits.check_text(texts, "prompt" if req.prompt is not None else "messages")
        return await tokenize(self._tokenize, req)

    def _tokenize(self, req: TokenizeRequest) -> bytes:
        if req.prompt is not None:
            ids = self.inputs.encode_text(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            messages = load_message_images(chat_messages(req.messages or []), self.limits.images)
            ids, _ = self.inputs.encode_chat_prompt(messages, req.add_generation_prompt)
        return TokenizeResponse(count=len(ids), max_model_len=self.models.max_model_len, tokens=ids,
                                token_strs=self.inputs.token_strings(ids)).model_dump_json().encode()

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.models.check(req.model)
        vocab = self.models.info.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token ids must be in [0, {vocab}); got {bad[:5]}", param="tokens")
        return DetokenizeResponse(prompt=self.inputs.decode(req.tokens))

    def info(self) -> TokenizerInfo:
        tok = self.inputs.tokenizer

        def text(name: str) -> str | None:
            value = getattr(tok, name, None)
            return None if value is None else str(value)

        def flag(name: str) -> bool | None:
            value = getattr(tok, name, None)
            return value if isinstance(value, bool) else None

        template = getattr(tok, "chat_template", None)
        return TokenizerInfo(
            tokenizer_class=type(tok).__name__, model_max_length=self.models.max_model_len,
            vocab_size=self.models.info.vocab_size, bos_token=text("bos_token"), eos_token=text("eos_token"),
            pad_token=text("pad_token"), unk_token=text("unk_token"), add_bos_token=flag("add_bos_token"),
            add_eos_token=flag("add_eos_token"), chat_template=template if isinstance(template, str) else None,
            special_tokens=sorted(str(t) for t in getattr(tok, "all_special_tokens", []) or []))
