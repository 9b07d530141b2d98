"""The model runner: the Hugging Face backend's one steered forward.

Every forward pass goes through :meth:`ModelRunner.forward`: the engine's prefill and decode steps (through the
slot KV cache), its cache-free steps, and every job's forwards (packed rows of token ids, or embeddings for
gradient work). One call builds the attention mask (causal, a packed tree, or over the cache; with the model's
sliding windows), the rows' steering gates at their absolute positions, plans the KV cache, and runs the
decoder with the hooks active, clearing all of it in ``finally``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import torch

from steering.backends.hf.hooks import (
    DeviceApplication,
    SteeringBatch,
    SteeringHooks,
    StepSteering,
    StepTelemetry,
    to_device,
)
from steering.backends.hf.kv_cache import SlotKVCache
from steering.backends.hf.loading import LoadedModel
from steering.backends.hf.masks import AttentionMasks
from steering.backends.hf.vision import ImageEncoder
from steering.spec import ResolvedApplication

Rows = Sequence[Sequence[DeviceApplication]]


class ModelRunner:
    def __init__(self, lm: LoadedModel, cache: SlotKVCache | None = None) -> None:
        self.lm = lm
        self.base = lm.backbone
        self.images = ImageEncoder(lm) if lm.vision is not None else None
        """A vision-language model's image features, merged embeddings and positions (None: text only)."""
        self.hooks = SteeringHooks(lm.layers)
        self.masks = AttentionMasks(lm)
        self.cache = cache
        params = inspect.signature(self.base.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x
        # Decode steps reuse their steering while the batch is unchanged: (key, batch, phase-only gates).
        self._reuse: tuple[Hashable, SteeringBatch | None, StepSteering | None] | None = None

    def device_steering(self, apps: Sequence[ResolvedApplication]) -> list[DeviceApplication]:
        return to_device(apps, self.lm.device, self.lm.dtype)

    @staticmethod
    def causal(positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """"May query see key" [n, Q, kv_len] for queries at ``positions`` [n, Q] over keys at 0..kv_len-1."""
        k = torch.arange(kv_len, device=positions.device).expand(positions.shape[0], kv_len)
        return k.unsqueeze(1) <= positions.unsqueeze(-1)

    def forward(self, *, positions: torch.Tensor, prompt_lens: torch.Tensor, input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                steering: Rows | None = None, steering_key: Hashable | None = None,
                kv: Literal["prefill", "decode"] | None = None, slot_start: int = 0,
                capture: Callable[[int, torch.Tensor], None] | None = None, output_attentions: bool = False,
                rope_positions: torch.Tensor | None = None, telemetry: StepTelemetry | None = None) -> Any:
        """Run the decoder; return the model's output (``last_hidden_state``, ``attentions``).

        ``positions`` [n, L] absolute; ``prompt_lens`` [n]: each row's prompt part for steering. ``keep``
        [n, L, K]: may query see key (None: the model's own causal mask, or, for ``kv="decode"``, every written
        cache position). ``steering``: each row's applications. ``steering_key`` identifies a batch whose rows
        are all past their prompts and unchanged since the last call with that key (decode), so its steering is
        reused. ``kv``: write the KV cache (``prefill`` into slots ``slot_start..``) or decode through it.
        ``rope_positions``: the model's rotary positions where they are not the token positions (a
        vision-language model's multimodal rotary positions, [3, n, L]).
        ``telemetry``: measure each row's steering into it (the engine's forwards)."""
        cache = self.cache if kv is not None else None
        if kv is not None and cache is None:
            raise RuntimeError("this runner has no KV cache")
        n, length = positions.shape
        k_pos = positions
        try:
            if kv == "prefill":
                assert cache is not None
                cache.plan_prefill(slot_start, n, length)
            elif kv == "decode":
                assert cache is not None
                cache.plan_decode(positions[:, 0])
                k_pos = torch.arange(cache.kv_len, device=positions.device).expand(n, -1)
                keep = self.causal(positions, cache.kv_len)
            mask = None if keep is None else self.masks(keep, positions, k_pos)
            step = self._steering(steering, positions, prompt_lens, steering_key)
            inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": input_ids}
            extra = {"output_attentions": True} if output_attentions else {}
            capturing = self.hooks.capturing(capture) if capture else contextlib.nullcontext()
            with self.hooks.active(step, telemetry), capturing:
                return self.base(**inputs, position_ids=positions if rope_positions is None else rope_positions,
                                 attention_mask=mask, use_cache=cache is not None, **{self._cache_kw: cache}, **extra)
        finally:
            if cache is not None:
                cache.clear_plan()

    def _steering(self, rows: Rows | None, positions: torch.Tensor, prompt_lens: torch.Tensor,
                  key: Hashable | None) -> StepSteering | None:
        lm = self.lm
        if key is None:
            if rows is None or not any(rows):
                return None
            return SteeringBatch(rows, lm.hidden_size, lm.device, lm.dtype).gates(positions, prompt_lens)
        reuse = self._reuse
        if reuse is None or reuse[0] != key:
            batch = SteeringBatch(rows, lm.hidden_size, lm.device, lm.dtype) if rows and any(rows) else None
            reuse = (key, batch, None)
        _, batch, step = reuse
        if batch is None:
            self._reuse = reuse
            return None
        if step is None or not batch.position_free:
            step = batch.gates(positions, prompt_lens)
        # Every row is past its prompt, so phase-only gates stay valid while the batch is unchanged.
        self._reuse = (key, batch, step if batch.position_free else None)
        return step

    def close(self) -> None:
        self.hooks.remove()
        self._reuse = None
