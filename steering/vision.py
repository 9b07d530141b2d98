"""The image side of a vision-language model's input encoding: its image processor, and how each image's
placeholder in the rendered chat template expands into the tokens its features take the place of.

The expansion is done on the text, as the models' own Hugging Face processors do, then the text is tokenized and
each image's run of image tokens is found: so a prompt is exactly what the model's processor would give, and every
image token's absolute position is known (steering's ``image`` positions, attribution's patch grids). Only the
image processor is loaded (its Pillow implementation where torchvision is absent), so the families work without
the processor classes (which need torchvision for their video part).

Families (``model_type``):

* ``llava``: ``<image>`` becomes the vision tower's patch grid ((image size / patch size)^2 tokens, plus the CLS
  token with ``vision_feature_select_strategy="full"``);
* ``qwen2_vl``, ``qwen2_5_vl``: ``<|image_pad|>`` (between the template's vision start and end tokens) becomes one
  token per merged patch (t x h x w / merge^2); rotary positions are multimodal (M-RoPE, from the model);
* ``gemma3``: ``<start_of_image>`` becomes ``\\n\\n<start_of_image>`` + ``mm_tokens_per_image`` soft tokens +
  ``<end_of_image>\\n\\n``; an image's tokens attend to each other both ways.

Other vision-language models are refused at load with the list above.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steering.errors import InvalidRequestError, ModelLoadError
from steering.multimodal import LoadedImage, PromptImage

SUPPORTED_FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "gemma3")


def is_vision_config(config: Any) -> bool:
    """Whether a model config describes a vision-language model (it has a vision tower)."""
    return getattr(config, "vision_config", None) is not None


def _token_id(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ModelLoadError(f"{config.model_type}: the config names no image token ({', '.join(names)})")


@dataclass
class VisionFront:
    """A vision-language model's image processor and placeholder rules (see the module's docstring)."""

    family: str
    image_processor: Any
    image_token: str
    """The token whose embeddings an image's features replace (one per feature)."""
    image_token_id: int
    placeholder: str
    """What the chat template writes for one image."""
    expansion: Callable[[Mapping[str, Any]], tuple[str, int]]
    """Per image (its processor tensors): the text that replaces its placeholder, and how many image tokens it holds."""
    layout: Callable[[Mapping[str, Any], int], tuple[int, int]]
    """Per image (its tensors, its token count): rows and columns of its tokens."""
    keys: tuple[str, ...] = ("pixel_values",)
    """The image processor's outputs the model's ``get_image_features`` takes."""
    mrope: bool = False
    """Rotary positions are multimodal (from the model's ``get_rope_index``)."""
    bidirectional: bool = False
    """An image's tokens attend to each other in both directions (Gemma 3)."""

    def process(self, image: LoadedImage) -> dict[str, Any]:
        """The image processor's tensors for one image (CPU)."""
        out = self.image_processor(images=[image.image], return_tensors="pt")
        return {k: out[k] for k in self.keys}

    def expand(self, text: str, images: Sequence[LoadedImage], param: str = "messages") -> tuple[str, list[Any]]:
        """``text`` with each image's placeholder expanded (in order); returns it and each image's tensors."""
        parts = text.split(self.placeholder)
        if len(parts) - 1 != len(images):
            raise InvalidRequestError(f"the prompt has {len(parts) - 1} image placeholders ({self.placeholder!r}) "
                                      f"for {len(images)} images; write none yourself", param=param)
        tensors = [self.process(im) for im in images]
        out = [parts[0]]
        for t, rest in zip(tensors, parts[1:], strict=True):
            out.append(self.expansion(t)[0])
            out.append(rest)
        return "".join(out), tensors

    def place(self, ids: Sequence[int], tensors: Sequence[Mapping[str, Any]],
              images: Sequence[LoadedImage]) -> tuple[PromptImage, ...]:
        """Each image's run of image tokens in the tokenized prompt, in order."""
        at = [i for i, t in enumerate(ids) if t == self.image_token_id]
        placed, k = [], 0
        for t, im in zip(tensors, images, strict=True):
            count = self.expansion(t)[1]
            pos = tuple(at[k:k + count])
            if len(pos) != count:
                raise InvalidRequestError("the prompt's image tokens do not match its images", param="messages")
            placed.append(PromptImage(t, pos, self.layout(t, count), im.digest, im.size))
            k += count
        if k != len(at):
            raise InvalidRequestError(f"the prompt has {len(at) - k} image tokens no image fills; do not write "
                                      f"{self.image_token!r} yourself", param="messages")
        return tuple(placed)

    @classmethod
    def for_model(cls, config: Any, model_dir: Path, tokenizer: Any) -> VisionFront:
        """The front of a vision-language model loaded from ``model_dir``; ModelLoadError for a family it does
        not know or a directory without an image processor."""
        family = getattr(config, "model_type", None)
        if family not in SUPPORTED_FAMILIES:
            raise ModelLoadError(f"vision-language model type {family!r} is not supported; supported: "
                                 f"{', '.join(SUPPORTED_FAMILIES)}")
        processor = load_image_processor(model_dir)
        tok = tokenizer.convert_ids_to_tokens
        if family == "llava":
            image_id = _token_id(config, "image_token_id", "image_token_index")
            image = tok(image_id)
            vc = config.vision_config
            patch = int(vc.patch_size)
            extra = 1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0

            def llava_grid(t: Mapping[str, Any]) -> tuple[int, int]:
                h, w = t["pixel_values"].shape[-2:]
                return int(h) // patch, int(w) // patch

            def llava_expand(t: Mapping[str, Any]) -> tuple[str, int]:
                rows, cols = llava_grid(t)
                n = rows * cols + extra
                return image * n, n

            return cls(family, processor, image, image_id, image, llava_expand,
                       lambda t, n: llava_grid(t) if n == math.prod(llava_grid(t)) else (1, n))
        if family in ("qwen2_vl", "qwen2_5_vl"):
            image_id = _token_id(config, "image_token_id")
            image = tok(image_id)
            merge = int(getattr(processor, "merge_size", None) or config.vision_config.spatial_merge_size)

            def qwen_expand(t: Mapping[str, Any]) -> tuple[str, int]:
                n = int(t["image_grid_thw"][0].prod()) // merge**2
                return image * n, n

            def qwen_layout(t: Mapping[str, Any], n: int) -> tuple[int, int]:
                _, h, w = (int(x) for x in t["image_grid_thw"][0])
                return h // merge, n // (h // merge)

            return cls(family, processor, image, image_id, image, qwen_expand, qwen_layout,
                       keys=("pixel_values", "image_grid_thw"), mrope=True)
        # gemma3
        image_id = _token_id(config, "image_token_id", "image_token_index")
        image = tok(image_id)
        boi = tok(_token_id(config, "boi_token_id", "boi_token_index"))
        eoi = tok(_token_id(config, "eoi_token_id", "eoi_token_index"))
        n_tokens = int(getattr(config, "mm_tokens_per_image", 256))
        side = math.isqrt(n_tokens)

        def gemma_expand(t: Mapping[str, Any]) -> tuple[str, int]:
            return f"\n\n{boi}{image * n_tokens}{eoi}\n\n", n_tokens

        return cls(family, processor, image, image_id, boi, gemma_expand,
                   lambda t, n: (side, n // side) if side * side == n else (1, n), bidirectional=True)


def load_image_processor(model_dir: Path) -> Any:
    """The model's image processor (its Pillow implementation when torchvision is not installed)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means the directory lacks a usable processor
        raise ModelLoadError(f"cannot load the image processor of {model_dir}: {exc}") from exc


def processor_chat_template(model_dir: Path) -> str | None:
    """A vision-language model's chat template, where its processor keeps it (``chat_template.jinja``, or
    ``chat_template.json`` / ``processor_config.json``'s ``chat_template``)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("chat_template.json", "processor_config.json"):
        f = model_dir / name
        if f.is_file():
            try:
                value = json.loads(f.read_text()).get("chat_template")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(value, str):
                return value
    return None
