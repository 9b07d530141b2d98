"""``/v1/models`` and the tokenizer endpoints."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.protocol.common import Strict, exactly_one
from server.protocol.generation import ChatMessage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "steerserve"
    max_model_len: int
    num_layers: int
    hidden_size: int
    input_modalities: list[Literal["text", "image"]] = ["text"]
    """``image`` for a vision-language model on a backend that runs its images."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizerInfo(BaseModel):
    """The tokenizer's configuration, as vLLM's ``/tokenizer_info`` gives it (lm-evaluation-harness's remote
    tokenizer reads it)."""

    tokenizer_class: str
    model_max_length: int
    vocab_size: int
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    chat_template: str | None = None
    special_tokens: list[str] = []


class TokenizeRequest(Strict):
    """Tokenize a ``prompt`` (text) or ``messages`` (with the chat template): exactly one."""

    model_config = ConfigDict(json_schema_extra=exactly_one("prompt", "messages"))

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str]


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
