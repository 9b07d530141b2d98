"""A slot-based KV cache for continuous batching with Hugging Face decoder models.

Each running sequence owns one slot (a batch row) of a per-layer key/value slab shaped
[slots, kv_heads, capacity, head_dim]. Running sequences are kept in slots 0..n-1 (a finished sequence's
slot is refilled by moving the last one into it), so a decode step works on the slab's first n rows
without gathering. Every sequence writes its keys and values at its own absolute positions; the engine
passes a 4-D attention mask that hides positions a row has not written. Capacity grows by doubling.

The model calls :meth:`update` from each attention layer; what it does is set by the runner before each
forward with :meth:`plan_prefill` or :meth:`plan_decode`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class SlotKVCache(Cache):
    def __init__(self, num_layers: int, max_slots: int, max_len: int, initial_capacity: int = 256) -> None:
        super().__init__(layers=[])
        self.num_layers = num_layers
        self.max_slots = max_slots
        self.max_len = max_len
        self.capacity = min(initial_capacity, max_len)
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self._mode: str | None = None
        self._start = 0
        self._rows = 0
        self._positions: torch.Tensor | None = None
        self._row_index: torch.Tensor | None = None
        self._kv_len = 0

    # -- planning (engine side) --------------------------------------------------------------------------------
    def plan_prefill(self, start_slot: int, rows: int, length: int) -> None:
        """Next forward writes ``rows`` sequences of ``length`` tokens at positions 0..length-1 of slots start.."""
        self.ensure_capacity(length)
        self._mode, self._start, self._rows, self._kv_len = "prefill", start_slot, rows, length

    def plan_decode(self, positions: torch.Tensor) -> None:
        """Next forward writes one token per slot 0..n-1 at ``positions`` [n] and attends over all written."""
        n = positions.shape[0]
        kv_len = int(positions.max()) + 1
        self.ensure_capacity(kv_len)
        self._mode, self._rows, self._kv_len = "decode", n, kv_len
        self._positions = positions
        self._row_index = torch.arange(n, device=positions.device)

    def clear_plan(self) -> None:
        self._mode = None

    @property
    def kv_len(self) -> int:
        """Key positions the planned forward attends over."""
        return self._kv_len

    def ensure_capacity(self, length: int) -> None:
        if length <= self.capacity:
            return
        new_cap = self.capacity
        while new_cap < length:
            new_cap *= 2
        new_cap = min(max(new_cap, length), self.max_len)
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                if t is not None:
                    grown = t.new_zeros(t.shape[0], t.shape[1], new_cap, t.shape[3])
                    grown[:, :, : self.capacity] = t
                    store[i] = grown
        self.capacity = new_cap

    def clear_slot(self, slot: int) -> None:
        """Zero a slot: a row whose states went non-finite must not leave NaN/Inf keys behind, because masked
        positions still enter attention (NaN plus a large negative mask is NaN) for the row that gets the slot."""
        for store in (self.keys, self.values):
            for t in store:
                if t is not None:
                    t[slot].zero_()

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions into slot ``dst`` (compaction after a finish)."""
        for store in (self.keys, self.values):
            for t in store:
                if t is not None:
                    t[dst, :, :length] = t[src, :, :length]

    # -- Cache interface (model side) --------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.keys[layer_idx] is None:
            shape = (self.max_slots, key_states.shape[1], self.capacity, key_states.shape[3])
            self.keys[layer_idx] = key_states.new_zeros(shape)
            self.values[layer_idx] = value_states.new_zeros(shape)
        k_store, v_store = self.keys[layer_idx], self.values[layer_idx]
        assert k_store is not None and v_store is not None
        if self._mode == "prefill":
            s, e, t = self._start, self._start + self._rows, key_states.shape[2]
            k_store[s:e, :, :t] = key_states
            v_store[s:e, :, :t] = value_states
            return k_store[s:e, :, :t], v_store[s:e, :, :t]
        if self._mode == "decode":
            n = self._rows
            k_store[self._row_index, :, self._positions] = key_states[:, :, 0]
            v_store[self._row_index, :, self._positions] = value_states[:, :, 0]
            return k_store[:n, :, : self._kv_len], v_store[:n, :, : self._kv_len]
        raise RuntimeError("SlotKVCache.update called without a plan")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len if self._mode == "decode" else 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._kv_len, 0

    @property
    def is_compileable(self) -> bool:
        return False
