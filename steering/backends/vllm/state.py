"""The workers' steering state: persistent buffers at fixed addresses (allocated once, before the first compiled
or captured forward), the vector bank, per-request slots, and the per-step fill.

S = max_num_seqs + 1 slots (slot 0 = unsteered); K = applications per request; L = layers; R = bank rows
(row 0 = zeros); T = max_num_batched_tokens; P = max_model_len::

    tok_slot    [T]          int64   slot of each token of this step; 0 for unsteered rows and the padded tail
    tok_idx     [T]          int64   indices of the step's steered tokens (the first ``num_steered``)
    slot_plen   [S]          int64   prompt length of the slot's request
    entry_row   [S, L, K]    int64   bank row of application k at layer l (0: it does not act there)
    entry_scale [S, K]       fp32
    entry_mode  [S, K]       int64   0 all, 1 prompt, 2 generated, 3 explicit positions
    entry_norm  [S, K]       bool
    pos_bits    [S, K, P/8]  uint8   explicit positions, a bitmap
    bank        [R, H]       fp32    vector rows, by key (registered through the worker extension)
    tel_sum     [S]          fp32    telemetry: the slot's sum of r = ||h' - h|| / ||h|| over measured (token, layer)
    tel_count   [S]          fp32    ... and how many pairs were measured
    tel_on      []           fp32    1 on a measured step (the dense op reads it: it cannot read host state)
    layer_tokens_dev [L]     int64   steered tokens per layer (the dense op's count; the sparse op counts on host)

The op (:mod:`.op`) reads only these; torch.compile sees one opaque call per layer. A slot belongs to a live
request: its tables are written once, when the request first appears in a step, and cleared when it finishes.
When slots run out, the slot of a request absent from the step (preempted) is reclaimed; it is filled again when
the request returns.

Telemetry: the steered tokens per layer are counted on every step; the relative change r is measured on sampled
steps only (it costs ops on the hot path): every ``telemetry_every``-th steered step, and every step whose batch
changed (so each request is measured at least on its first step). When a request's slot is released, its sums are
kept (on the device, no sync) until the server pulls them (:meth:`SteerState.pull_telemetry`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from typing import Any

import numpy as np
import torch

from steering.backends.vllm import wire

log = logging.getLogger("steerserve.vllm")

_STATE: SteerState | None = None


def get_state() -> SteerState | None:
    return _STATE


def set_state(state: SteerState | None) -> None:
    global _STATE
    _STATE = state


class SteerState:
    def __init__(self, *, max_num_tokens: int, max_num_seqs: int, hidden_size: int, num_layers: int,
                 max_model_len: int, device: torch.device, max_applications: int, bank_rows: int,
                 dense: bool, telemetry_every: int = 8) -> None:
        self.T, self.H, self.L, self.P = max_num_tokens, hidden_size, num_layers, max_model_len
        self.K = max_applications
        self.S = max_num_seqs + 1
        self.R = bank_rows + 1
        self.dense = dense
        """Dense: the op computes every token of the step with masks and no host state (capture-safe, for CUDA
        graphs). Sparse: it gathers the steered tokens only, guided by host counts (CPU and eager GPU)."""
        d = self.device = device
        self.tok_slot = torch.zeros(self.T, dtype=torch.int64, device=d)
        self.tok_idx = torch.zeros(self.T, dtype=torch.int64, device=d)
        self.slot_plen = torch.zeros(self.S, dtype=torch.int64, device=d)
        self.entry_row = torch.zeros(self.S, self.L, self.K, dtype=torch.int64, device=d)
        self.entry_scale = torch.zeros(self.S, self.K, dtype=torch.float32, device=d)
        self.entry_mode = torch.zeros(self.S, self.K, dtype=torch.int64, device=d)
        self.entry_norm = torch.zeros(self.S, self.K, dtype=torch.bool, device=d)
        self.pos_bits = torch.zeros(self.S, self.K, (self.P + 7) // 8, dtype=torch.uint8, device=d)
        self.bank = torch.zeros(self.R, self.H, dtype=torch.float32, device=d)
        self.telemetry_every = telemetry_every
        """Measure r on every n-th steered step (and when the batch changed); 0: never."""
        self.tel_sum = torch.zeros(self.S, dtype=torch.float32, device=d)
        self.tel_count = torch.zeros(self.S, dtype=torch.float32, device=d)
        self.tel_on = torch.zeros((), dtype=torch.float32, device=d)
        self.layer_tokens_dev = torch.zeros(self.L, dtype=torch.int64, device=d)
        self.layer_tokens = np.zeros(self.L, dtype=np.int64)
        """Steered tokens per layer counted by the sparse op (the dense op's are on the device)."""
        self.measure = False
        """This step's r is measured (sparse op; the dense op reads ``tel_on``)."""
        self.tel_pending: list[int] = []
        """Layers whose norms the sparse op kept this step, measured together after ``last_layer``."""
        self.last_layer = -1
        """The step's last steered layer."""
        self._measured_epoch = -1
        self._tel_on = False  # what tel_on holds
        self._finished: deque[tuple[str, torch.Tensor]] = deque()
        self._carry: dict[str, torch.Tensor] = {}
        """A preempted request's sums while its slot serves another (given back when it returns)."""
        self.num_steered = 0
        self.all_steered = False
        """Every token of the step is steered (the op then works in place, without gathering)."""
        self.layer_active = [False] * self.L
        self.suspended = False
        self.step = 0
        """Counts fills: the sparse op caches what does not depend on the layer once per step."""
        self.k_used = 0
        """Applications of the step's busiest slot: the sparse op loops over these only."""
        self.any_norm = self.any_raw = False
        self.step_cache: tuple[int, Any] | None = None
        self.plan_cache: tuple[Any, Any, Any] | None = None
        """The op's plan of an earlier step, reused while ``step_key`` and the acting applications are the same."""
        self.epoch = 0
        """Counts slot assignments and releases: part of ``step_key``, since a slot's tables change only then."""
        self.step_key: tuple[int, bytes, bytes] | None = None
        self._prev_T = 0
        self._free_rows = list(range(self.R - 1, 0, -1))
        self.keys: dict[str, dict[int, int]] = {}
        self._key_slots: Counter[str] = Counter()  # live slots using each key
        self._dropped: set[str] = set()  # unregistered while in use: freed when the last slot releases it
        self._slot_of: dict[str, int] = {}
        self._slot_req: list[str | None] = [None] * self.S
        self._slot_layers: list[set[int]] = [set() for _ in range(self.S)]
        self._slot_kind: list[tuple[int, bool, bool]] = [(0, False, False)] * self.S  # (apps, any norm, any raw)
        self._slot_keys: list[list[str]] = [[] for _ in range(self.S)]
        self._unsteered: set[str] = set()
        self.stats: Counter[str] = Counter()
        self.op_seconds = 0.0
        """Host time spent in the op (on a GPU, launching its kernels) and in :meth:`fill`: the steering's own cost
        in the workers, reported with the counters."""
        self.fill_seconds = 0.0

    # -- the bank
    def register(self, key: str, values: dict[Any, Any]) -> dict[str, Any]:
        """Store a vector's rows under ``key`` (idempotent). Never raises for a full bank: says so."""
        if key in self.keys:
            self._dropped.discard(key)
            return {"status": "ok", "layers": sorted(self.keys[key])}
        rows: dict[int, np.ndarray] = {}
        for k, v in values.items():
            try:
                layer = int(k)
                arr = np.frombuffer(bytes(v), dtype="<f4") if isinstance(v, (bytes, bytearray, memoryview)) \
                    else np.asarray(v, dtype=np.float32)
            except (TypeError, ValueError):
                arr = np.zeros(0, dtype=np.float32)
                layer = -1
            if arr.shape != (self.H,) or not 0 <= layer < self.L or not np.isfinite(arr).all():
                return {"status": "invalid", "reason": f"layer {layer}: need {self.H} finite values "
                                                      f"on a layer in 0..{self.L - 1}"}
            rows[layer] = arr
        if len(rows) > len(self._free_rows):
            return {"status": "full", "free": len(self._free_rows)}
        placed = {}
        for layer, arr in rows.items():
            row = self._free_rows.pop()
            self.bank[row].copy_(torch.from_numpy(arr.copy()))
            placed[layer] = row
        self.keys[key] = placed
        self.stats["registered"] += 1
        return {"status": "ok", "layers": sorted(placed)}

    def unregister(self, key: str) -> bool:
        if key not in self.keys:
            return False
        if self._key_slots[key] > 0:
            self._dropped.add(key)
        else:
            self._free_key(key)
        return True

    def _free_key(self, key: str) -> None:
        for row in self.keys.pop(key).values():
            self.bank[row].zero_()
            self._free_rows.append(row)
        self._dropped.discard(key)
        self._key_slots.pop(key, None)
        self.stats["unregistered"] += 1

    def key_layers(self, key: str) -> frozenset[int] | None:
        rows = self.keys.get(key)
        return None if rows is None or key in self._dropped else frozenset(rows)

    # -- telemetry
    MAX_FINISHED = 4096
    """Finished requests' telemetry kept for the server's next pull (beyond: the oldest are dropped, counted)."""

    def _keep(self, req_id: str, sums: torch.Tensor) -> None:
        if not self.telemetry_every:
            return
        if len(self._finished) >= self.MAX_FINISHED:
            self._finished.popleft()
            self.stats["telemetry_dropped"] += 1
        self._finished.append((req_id, sums))

    def pull_telemetry(self) -> dict[str, Any]:
        """Finished steered requests' (id, sum of r, measured pairs; 0 pairs when none of their steps was
        measured) and the steered tokens per layer since the last pull; the only host sync of the telemetry, off
        the hot path."""
        items = list(self._finished)
        self._finished.clear()
        requests = []
        if items:
            sums = torch.stack([t for _, t in items]).tolist()
            requests = [[rid, s, int(n)] for (rid, _), (s, n) in zip(items, sums)]
        counts = self.layer_tokens.copy()
        self.layer_tokens[:] = 0
        if self.dense:
            counts += self.layer_tokens_dev.cpu().numpy()
            self.layer_tokens_dev.zero_()
        return {"requests": requests, "layer_tokens": counts.tolist()}

    # -- slots
    def release(self, req_id: str, final: bool = True) -> None:
        """Free a request's slot: it finished (``final``: its telemetry is kept for the server), or it was
        preempted and its slot is reclaimed (its sums wait for it to return)."""
        self._unsteered.discard(req_id)
        slot = self._slot_of.pop(req_id, None)
        if slot is None:
            carried = self._carry.pop(req_id, None) if final else None
            if carried is not None:
                self._keep(req_id, carried)
            return
        sums = torch.stack([self.tel_sum[slot], self.tel_count[slot]])  # a device copy: no sync
        self.tel_sum[slot] = 0
        self.tel_count[slot] = 0
        if final:
            self._keep(req_id, sums)
        else:
            self._carry[req_id] = sums
        for key in self._slot_keys[slot]:
            self._key_slots[key] -= 1
            if self._key_slots[key] <= 0 and key in self._dropped:
                self._free_key(key)
        self._slot_keys[slot] = []
        self._slot_layers[slot] = set()
        self._slot_kind[slot] = (0, False, False)
        self._slot_req[slot] = None
        self.entry_row[slot].zero_()
        self.entry_scale[slot].zero_()
        self.entry_mode[slot].zero_()
        self.entry_norm[slot].zero_()
        self.pos_bits[slot].zero_()
        self.slot_plen[slot] = 0
        self.epoch += 1
        self.stats["slots_released"] += 1

    def _free_slot(self, live: set[str]) -> int:
        for s in range(1, self.S):
            if self._slot_req[s] is None:
                return s
        for s in range(1, self.S):
            rid = self._slot_req[s]
            if rid is not None and rid not in live:
                self.release(rid, final=False)
                self.stats["slots_reclaimed"] += 1
                return s
        raise RuntimeError("steerserve: more steered requests in one step than slots (max_num_seqs)")

    def _assign(self, req_id: str, apps: list[wire.WireApplication], prompt_len: int, live: set[str]) -> int:
        slot = self._free_slot(live)
        layers: set[int] = set()
        for k, app in enumerate(apps):
            rows = self.keys[app.key]
            for layer in app.layers:
                self.entry_row[slot, layer, k] = rows[layer]
                layers.add(layer)
            self.entry_scale[slot, k] = app.scale
            self.entry_mode[slot, k] = app.mode
            self.entry_norm[slot, k] = app.normalize
            if app.mode == wire.EXPLICIT:
                ps = np.array([p for p in app.explicit if p < self.P], dtype=np.int64)
                if ps.size:
                    bits = np.zeros((self.P + 7) // 8, dtype=np.uint8)
                    np.bitwise_or.at(bits, ps >> 3, (1 << (ps & 7)).astype(np.uint8))
                    self.pos_bits[slot, k].copy_(torch.from_numpy(bits))
            self._key_slots[app.key] += 1
        self.slot_plen[slot] = prompt_len
        carried = self._carry.pop(req_id, None)
        if carried is not None:  # a preempted request returns: its sums go on
            self.tel_sum[slot] = carried[0]
            self.tel_count[slot] = carried[1]
        self._slot_of[req_id] = slot
        self._slot_req[slot] = req_id
        self._slot_layers[slot] = layers
        self._slot_kind[slot] = (len(apps), any(a.normalize for a in apps), any(not a.normalize for a in apps))
        self._slot_keys[slot] = [a.key for a in apps]
        self.epoch += 1
        self.stats["slots_assigned"] += 1
        return slot

    def _slot_for(self, req_id: str, req_state: Any, live: set[str]) -> int:
        slot = self._slot_of.get(req_id)
        if slot is not None:
            return slot
        if req_id in self._unsteered:
            return 0
        sp = req_state.sampling_params
        raw = sp.extra_args.get(wire.KEY) if sp is not None and sp.extra_args else None
        if raw is None:
            self._unsteered.add(req_id)
            return 0
        try:
            apps = wire.parse(raw, num_layers=self.L, key_layers=self.key_layers, max_applications=self.K)
        except wire.SpecError as exc:
            log.error("steerserve: request %s carries invalid steering and runs unsteered: %s", req_id, exc)
            self.stats["invalid_specs"] += 1
            self._unsteered.add(req_id)
            return 0
        apps = [a for a in apps if a.scale != 0]
        if not apps:
            self._unsteered.add(req_id)
            return 0
        return self._assign(req_id, apps, req_state.num_prompt_tokens, live)

    # -- every step
    def fill(self, runner: Any, num_scheduled_tokens: np.ndarray) -> None:
        """Right after the runner's ``_prepare_inputs``, when the batch order is final."""
        t0 = time.perf_counter()
        batch = runner.input_batch
        req_ids = batch.req_ids[: batch.num_reqs]
        live = set(req_ids)
        slots = np.fromiter((self._slot_for(r, runner.requests[r], live) for r in req_ids), dtype=np.int64,
                            count=len(req_ids))
        T = int(num_scheduled_tokens.sum())
        if slots.any():
            tok = np.repeat(slots, num_scheduled_tokens[: len(slots)])
            self.tok_slot[:T].copy_(torch.from_numpy(tok))
            idx = np.flatnonzero(tok)
            self.tok_idx[: len(idx)].copy_(torch.from_numpy(idx))
            self.num_steered = len(idx)
            self.all_steered = len(idx) == T
            self.step_key = (self.epoch, slots.tobytes(), num_scheduled_tokens[: len(slots)].tobytes())
            active: set[int] = set()
            kinds = []
            for s in set(slots.tolist()) - {0}:
                active |= self._slot_layers[s]
                kinds.append(self._slot_kind[s])
            self.layer_active = [layer in active for layer in range(self.L)]
            self.last_layer = max(active, default=-1)
            self.tel_pending = []
            self.k_used = max(k for k, _, _ in kinds)
            self.any_norm = any(n for _, n, _ in kinds)
            self.any_raw = any(r for _, _, r in kinds)
            self.stats["steered_tokens"] += len(idx)
            self.stats["steered_steps"] += 1
            every = self.telemetry_every
            measure = bool(every) and (self.epoch != self._measured_epoch or self.stats["steered_steps"] % every == 0)
            if measure:
                self._measured_epoch = self.epoch
                self.stats["measured_steps"] += 1
            if self.dense and every and measure != self._tel_on:
                self.tel_on.fill_(1.0 if measure else 0.0)
                self._tel_on = measure
            self.measure = measure
        elif self.num_steered or self._prev_T:
            self.tok_slot[:T].zero_()
            self.measure = False
            self.num_steered = 0
            self.all_steered = False
            self.layer_active = [False] * self.L
        if self._prev_T > T:
            self.tok_slot[T:self._prev_T].zero_()
        self._prev_T = T if slots.any() else 0
        self.step += 1
        self.step_cache = None
        self.stats["steps"] += 1
        self.fill_seconds += time.perf_counter() - t0

    def quiesce(self) -> None:
        """Before a dummy run (profiling, warm-up, graph capture): no token is steered."""
        self.tok_slot.zero_()
        self.num_steered = 0
        self.all_steered = False
        self.layer_active = [False] * self.L
        self._prev_T = 0
        self.step += 1
        self.step_cache = None

    def snapshot(self) -> dict[str, Any]:
        return {"slots_in_use": len(self._slot_of), "slots": self.S - 1, "bank_rows": self.R - 1,
                "bank_rows_free": len(self._free_rows), "keys": sorted(self.keys), "dense": self.dense,
                "max_applications": self.K, "op_seconds": round(self.op_seconds, 6),
                "fill_seconds": round(self.fill_seconds, 6), "telemetry_every": self.telemetry_every,
                "telemetry_pending": len(self._finished), **self.stats}
