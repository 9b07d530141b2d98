"""Additive 4-D attention masks built from "query may see key" tensors, with the model's sliding windows.

The runner replaces the model's own masks (to carry packed rows and the slot KV cache), so the masks must carry
the sliding windows themselves: per layer type for Gemma 2/3 and Qwen2 with windows, one windowed mask for
Mistral.
"""

from __future__ import annotations

import torch

from steering.backends.hf.loading import LoadedModel


class AttentionMasks:
    """Additive 4-D attention masks for a model, with its sliding windows where it has them."""

    def __init__(self, lm: LoadedModel) -> None:
        text_cfg = lm.text_config
        # Per-layer masks (Gemma 2/3, Qwen2 with windows) or one windowed mask (Mistral); our masks replace the
        # model's own, so they must carry the window themselves.
        window = getattr(text_cfg, "sliding_window", None)
        layer_types = getattr(text_cfg, "layer_types", None) or []
        self.window = int(window) if window else None
        self.mode = (
            None if self.window is None
            else "per_layer" if "sliding_attention" in layer_types
            else None if layer_types else "all"
        )
        self.dtype = lm.dtype

    def additive(self, keep: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(keep.shape, device=keep.device, dtype=self.dtype)
        return mask.masked_fill_(~keep, torch.finfo(self.dtype).min).unsqueeze(1)

    def __call__(self, keep: torch.Tensor, q_pos: torch.Tensor,
                 k_pos: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """``keep`` [n, Q, K]: may query q see key k; ``q_pos`` [n, Q] and ``k_pos`` [n, K] absolute positions."""
        full = self.additive(keep)
        if self.mode is None:
            return full
        assert self.window is not None
        windowed = self.additive(keep & (k_pos.unsqueeze(1) > q_pos.unsqueeze(-1) - self.window))
        return {"full_attention": full, "sliding_attention": windowed} if self.mode == "per_layer" else windowed
