"""Turning text and chat messages into token ids (and back) with the model's own tokenizer and chat template.

:class:`Inputs` is what every backend exposes as ``backend.inputs``: both the Hugging Face engine and vLLM
tokenize with the model's Hugging Face tokenizer, so chat, completions, ``/tokenize``, attribution and the
builders all encode a prompt the same way (the ``developer`` role is the ``system`` role everywhere).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from steering.errors import InvalidRequestError
from steering.multimodal import LoadedImage, PromptImage
from steering.tools import ToolSpec, inline_tools, template_messages, template_renders_tools

if TYPE_CHECKING:
    from steering.vision import VisionFront

PromptFormat = Literal["raw", "chat"]
_ROLES = {"developer": "system"}


def answer_separator(prompt_format: str, separator: str | None) -> str:
    """Text between a prompt and an appended answer: one space after raw text, nothing after a chat
    generation prompt, unless given."""
    return separator if separator is not None else (" " if prompt_format == "raw" else "")


class Inputs:
    """The model's tokenizer, seen as the encoder of prompts and the decoder of tokens."""

    def __init__(self, tokenizer: Any, vision: VisionFront | None = None) -> None:
        self.tokenizer = tokenizer
        self.vision = vision
        """The image side of a vision-language model (None: the model takes text only)."""
        special = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        special.update(int(i) for i, t in added.items() if getattr(t, "special", False))
        self.special_token_ids: frozenset[int] = frozenset(special)
        """BOS/EOS/pad and every added token marked special (chat-template markers such as <|im_start|>)."""

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def eos_token_id(self) -> int | None:
        eos = self.tokenizer.eos_token_id
        return None if eos is None else int(eos)

    @property
    def pad_id(self) -> int:
        """The id that pads batch rows: the pad token, else EOS, else 0 (padding is never attended)."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pad) if pad is not None else 0

    # -- encoding -----------------------------------------------------------------------------------------------
    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def encode_continuation(self, text: str) -> list[int]:
        """Text appended after a prompt (an answer, a target): no special tokens."""
        return self.encode_text(text, add_special_tokens=False)

    @staticmethod
    def chat_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Messages as the chat template takes them (``developer`` is the ``system`` role)."""
        return [{**m, "role": _ROLES.get(str(m.get("role")), m.get("role"))} for m in messages]

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template renders ``tools`` itself (else they go into a system preamble)."""
        return template_renders_tools(getattr(self.tokenizer, "chat_template", None))

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    tools: Sequence[ToolSpec] | None = None) -> list[int]:
        """The messages through the chat template; ``tools`` (and earlier calls and results in the messages)
        rendered by the template when it can, else as :mod:`steering.tools` writes them. Messages with images
        need :meth:`encode_chat_prompt`."""
        ids, images = self.encode_chat_prompt(messages, add_generation_prompt, tools)
        if images:
            raise InvalidRequestError("this prompt has images; it is encoded with encode_chat_prompt",
                                      param="messages")
        return ids

    def encode_chat_prompt(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                           tools: Sequence[ToolSpec] | None = None) -> tuple[list[int], tuple[PromptImage, ...]]:
        """:meth:`encode_chat` for messages whose content may also be a list of parts, ``{"type": "text",
        "text": ...}`` and ``{"type": "image", "image": LoadedImage}``: each image's placeholder is expanded
        (:class:`steering.vision.VisionFront`); returns the token ids and the images placed in them."""
        if not self.has_chat_template:
            raise InvalidRequestError("this model's tokenizer has no chat template; use completions",
                                      param="messages")
        msgs, images = self._image_parts(self.chat_messages(messages))
        kwargs: dict[str, Any] = {}
        if self.renders_tools:
            msgs = template_messages(msgs)
            if tools:
                kwargs["tools"] = [t.as_template_tool() for t in tools]
        elif tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in msgs):
            if images:
                raise InvalidRequestError("tools beside images need a chat template that renders tools itself",
                                          param="tools")
            msgs = inline_tools(msgs, tools or [])
        else:
            msgs = [{**m, "content": m.get("content") or ""} for m in msgs]
        try:
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **kwargs)
        except Exception as exc:  # noqa: BLE001 - template errors are the caller's input errors
            raise InvalidRequestError(f"cannot apply the chat template: {exc}", param="messages") from exc
        if not images:
            return self.encode_text(text, add_special_tokens=False), ()
        assert self.vision is not None
        text, tensors = self.vision.expand(text, images)
        ids = self.encode_text(text, add_special_tokens=False)
        return ids, self.vision.place(ids, tensors, images)

    def _image_parts(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[LoadedImage]]:
        """Messages as the template takes them (a text-only content list joined into a string; image parts as
        ``{"type": "image"}``), and their images in order."""
        images: list[LoadedImage] = []
        out = []
        for i, m in enumerate(messages):
            content = m.get("content")
            if not isinstance(content, list):
                out.append(m)
                continue
            kinds = {part.get("type") for part in content}
            if not kinds <= {"text", "image"}:
                raise InvalidRequestError(f"content parts of types {sorted(kinds - {'text', 'image'})} are not "
                                          "taken here (images must be loaded first)", param=f"messages[{i}].content")
            if "image" not in kinds:
                out.append({**m, "content": "".join(str(part.get("text", "")) for part in content)})
                continue
            if self.vision is None:
                raise InvalidRequestError("this model does not take images (it is not a vision-language model)",
                                          param=f"messages[{i}].content")
            parts = []
            for part in content:
                if part.get("type") == "image":
                    images.append(part["image"])
                    parts.append({"type": "image"})
                else:
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
            out.append({**m, "content": parts})
        return out, images

    def placeholder_prompt(self, text: str, images: Sequence[LoadedImage]) -> tuple[list[int], tuple[PromptImage, ...]]:
        """A raw (non-chat) prompt with images: the images' placeholders come first, each on its own line, then the
        text (as LLaVA-style raw prompts are written)."""
        if not images:
            return self.encode_text(text), ()
        if self.vision is None:
            raise InvalidRequestError("this model does not take images (it is not a vision-language model)",
                                      param="image")
        expanded, tensors = self.vision.expand("".join(self.vision.placeholder + "\n" for _ in images) + text,
                                               images, param="image")
        ids = self.encode_text(expanded)
        return ids, self.vision.place(ids, tensors, images)

    def encode_prompt(self, text: str, prompt_format: PromptFormat | str = "raw",
                      system_prompt: str | None = None) -> list[int]:
        """``raw``: the text as is (with the tokenizer's special tokens); ``chat``: the text as a user message in
        the chat template, after an optional system message, with the generation prompt."""
        return self.encode_prompt_images(text, (), prompt_format, system_prompt)[0]

    def encode_prompt_images(self, text: str, images: Sequence[LoadedImage], prompt_format: PromptFormat | str = "raw",
                             system_prompt: str | None = None) -> tuple[list[int], tuple[PromptImage, ...]]:
        """:meth:`encode_prompt` with images: in the chat template the user message holds the images, then the
        text; raw, see :meth:`placeholder_prompt`."""
        if prompt_format == "chat":
            content: str | list[dict[str, Any]] = text if not images else \
                [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
            msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
                {"role": "user", "content": content}]
            return self.encode_chat_prompt(msgs)
        return self.placeholder_prompt(text, images)

    def check_image_tokens(self, ids: Sequence[int], images: Sequence[PromptImage], param: str = "prompt") -> None:
        """A vision-language model's prompt holds exactly its images' tokens: an image token no image fills (a
        placeholder typed into the text, or sent as a token id) would run as a meaningless embedding."""
        if self.vision is None:
            return
        count = sum(1 for t in ids if t == self.vision.image_token_id)
        if count != sum(len(im.positions) for im in images):
            raise InvalidRequestError(f"the prompt has {count} image tokens ({self.vision.image_token!r}) that no "
                                      "image of the request fills; send images as content parts, not as text or "
                                      "token ids", param=param)

    # -- decoding -----------------------------------------------------------------------------------------------
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_text(self, token_id: int) -> str:
        """One token as text (what logprobs and attributions show)."""
        return str(self.tokenizer.decode([token_id]))

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """The tokenizer's own token strings (``Ġthe``), as ``/tokenize`` returns them."""
        return list(self.tokenizer.convert_ids_to_tokens(list(ids)))
