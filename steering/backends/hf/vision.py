"""A vision-language model's images on the Hugging Face backend: their features (the model's own vision tower and
projector, ``get_image_features``), the input embeddings of rows that hold images (token embeddings with each
image's features in its tokens' places, as the model's own forward merges them), multimodal rotary positions
(Qwen2-VL's M-RoPE, from the model's ``get_rope_index``) and bidirectional attention inside an image (Gemma 3).

Everything else runs the language model alone (:attr:`LoadedModel.backbone`), so the KV cache, steering hooks,
packed rows and jobs work as for a text model: an image only changes what goes into the first layer. Features
are computed once per image and kept (least recently used first, up to a byte budget), so a prompt's image costs
one vision-tower pass whatever reads it again (no-cache steps, attribution's many forwards, a build's examples).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from steering.backends.hf.loading import LoadedModel
from steering.errors import InvalidRequestError
from steering.multimodal import PromptImage

RowImages = Sequence[PromptImage]


class ImageEncoder:
    """Image features, merged embeddings, rotary positions and attention for one vision-language model."""

    def __init__(self, lm: LoadedModel, cache_bytes: int = 256 * 2**20) -> None:
        assert lm.vision is not None
        self.lm = lm
        self.front = lm.vision
        self.inner = lm.model.model  # the multimodal model: get_image_features, get_rope_index
        self.cache_bytes = cache_bytes
        self._features: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.vision_passes = 0
        """Images run through the vision tower (not served from the cache)."""

    # -- features ------------------------------------------------------------------------------------------------
    def features(self, image: PromptImage) -> torch.Tensor:
        """[len(image.positions), hidden] in the model's dtype, on its device (no gradient)."""
        key = (image.digest,) + tuple((k, tuple(v.shape)) for k, v in sorted(image.tensors.items()))
        hit = self._features.get(key)
        if hit is not None:
            self._features.move_to_end(key)
            return hit
        lm = self.lm
        inputs = {k: v.to(lm.device, dtype=lm.dtype if v.is_floating_point() else v.dtype)
                  for k, v in image.tensors.items()}
        with torch.no_grad():
            out = self.inner.get_image_features(**inputs)
        feats = getattr(out, "pooler_output", out)
        if isinstance(feats, (list, tuple)):
            feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
        feats = feats.reshape(-1, feats.shape[-1]).to(lm.dtype).detach()
        if feats.shape[0] != len(image.positions):
            raise InvalidRequestError(f"the image gives {feats.shape[0]} features for {len(image.positions)} image "
                                      "tokens", param="messages")
        self.vision_passes += 1
        size = feats.numel() * feats.element_size()
        self._features[key] = feats
        self._bytes += size
        while self._bytes > self.cache_bytes and len(self._features) > 1:
            _, old = self._features.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()
        return feats

    def embed(self, ids: torch.Tensor, rows: Sequence[RowImages]) -> torch.Tensor:
        """Input embeddings [n, L, d] of token ids [n, L] with each row's images' features in their places."""
        e = self.lm.model.get_input_embeddings()(ids).detach()
        if any(rows):
            e = e.clone()
            for r, images in enumerate(rows):
                for im in images:
                    e[r, torch.tensor(im.positions, device=e.device)] = self.features(im).to(e.dtype)
        return e

    # -- positions and attention ---------------------------------------------------------------------------------
    def prompt_rope(self, ids: Sequence[int], images: RowImages) -> tuple[torch.Tensor, int]:
        """A prompt's multimodal rotary positions [3, P] and the offset of every later token's (its position +
        the offset, on all three axes)."""
        dev = self.lm.device
        types = torch.zeros(1, len(ids), dtype=torch.int32, device=dev)
        for im in images:
            types[0, torch.tensor(im.positions, device=dev)] = 1
        grid = torch.cat([im.tensors["image_grid_thw"] for im in images]).to(dev)
        pos, delta = self.inner.get_rope_index(torch.tensor([list(ids)], device=dev), types, image_grid_thw=grid)
        return pos[:, 0], int(delta.reshape(-1)[0])

    def rope(self, positions: torch.Tensor,
             prompts: Sequence[tuple[Sequence[int], RowImages]]) -> tuple[torch.Tensor | None, list[int]]:
        """Rotary positions [3, n, L] for rows at token positions [n, L] whose first ``len(ids)`` tokens are the
        prompt ``ids`` with ``images``, and each row's offset for later tokens; (None, zeros) when the model's
        rotary positions are the token positions."""
        deltas = [0] * len(prompts)
        if not self.front.mrope:
            return None, deltas
        rope = positions.unsqueeze(0).expand(3, -1, -1).clone()
        for r, (ids, images) in enumerate(prompts):
            if images:
                p, deltas[r] = self.prompt_rope(ids, images)
                rope[:, r] += deltas[r]
                rope[:, r, : len(ids)] = p
        return rope, deltas

    @staticmethod
    def later_rope(positions: torch.Tensor, deltas: Sequence[int]) -> torch.Tensor | None:
        """Rotary positions [3, n, L] of tokens after their rows' prompts (decode): token position + the row's
        offset from :meth:`rope` on every axis; None when no row has an offset."""
        if not any(deltas):
            return None
        offsets = torch.tensor(list(deltas), device=positions.device).view(-1, *([1] * (positions.dim() - 1)))
        return (positions + offsets).unsqueeze(0).expand(3, *positions.shape)

    def keep(self, keep: torch.Tensor, rows: Sequence[RowImages]) -> torch.Tensor:
        """``keep`` [n, Q, K] with every image's tokens seeing each other (for models that attend so inside an
        image); unchanged otherwise. Query and key indices are the rows' token indices."""
        if not self.front.bidirectional or not any(rows):
            return keep
        keep = keep.clone()
        for r, images in enumerate(rows):
            for im in images:
                idx = torch.tensor(im.positions, device=keep.device)
                keep[r, idx.unsqueeze(1), idx.unsqueeze(0)] = True
        return keep
