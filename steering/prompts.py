"""Turn text prompts and chat messages into token ids with the model's own tokenizer and chat template."""

from __future__ import annotations

from collections.abc import Sequence

from steering.errors import RequestValidationError


def encode_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_chat(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise RequestValidationError("this model's tokenizer has no chat template; use completions",
                                     param="messages")
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # noqa: BLE001 - template errors are the caller's input errors
        raise RequestValidationError(f"cannot apply the chat template: {exc}", param="messages") from exc
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer, text: str, prompt_format: str = "raw", system_prompt: str | None = None) -> list[int]:
    """``raw``: the text as is (with the tokenizer's special tokens); ``chat``: the text as a user message in the
    chat template, after an optional system message, with the generation prompt."""
    if prompt_format == "chat":
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": text}]
        return encode_chat(tokenizer, msgs)
    return encode_text(tokenizer, text)


def answer_separator(prompt_format: str, separator: str | None) -> str:
    """Text between a prompt and an appended answer: one space after raw text, nothing after a chat
    generation prompt, unless given."""
    return separator if separator is not None else (" " if prompt_format == "raw" else "")
