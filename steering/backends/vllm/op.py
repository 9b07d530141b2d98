"""The in-graph op ``torch.ops.steerserve.steer(hidden, residual, positions, layer)``.

vLLM's decoder layers pass the residual stream split in two: the block output is h = hidden + residual (the next
layer's fused add + RMSNorm forms it). After each armed layer the op computes, for every token with an active
application there,

    h' = (h + N) * ||h|| / ||h + N|| + R      (N: the sum of the normalising applications, R: the others)

exactly as the Hugging Face backend does on the block output, and writes ``residual <- h'``, ``hidden <- 0``, so
the next fused add sees h'. Tokens with nothing active keep their exact bits.

Two implementations of the same arithmetic (fp32, h rounded to the model dtype first, as the HF hooks see it):

* sparse: works on the step's steered tokens only (host counts from the fill say how many, and which layers act)
  and skips layers and steps with nothing to do. At a step's first steered layer it plans every layer (which
  tokens each acts on, and for small steps their summed deltas), with one host sync; decode steps reuse the plan
  while the batch and the acting applications stay the same, and when every token is steered it works in place
  (a decode step costs about 8 small ops per layer). For CPU and eager GPU runs.
* dense: computes every token of the step with masks and reads no host state, so it can be captured in a CUDA
  graph and replayed with new buffers; unsteered tokens are selected back unchanged.

Telemetry (:mod:`steering.backends.change`): the steered tokens per layer are counted every step (the sparse op
adds its plan's host counts once per step; the dense op adds on the device). On measured steps the op also adds
each acting token's r = ||h' - h|| / ||h|| to its slot's sums (``index_add_``), from the norms it computes anyway;
the dense op measures on every step, weighted by the ``tel_on`` flag, since a captured graph cannot branch. The
steered bits are the same with telemetry on or off.

The op is registered with ``direct_register_custom_op`` (it mutates hidden and residual; its fake is a no-op), so
Dynamo and Inductor keep it opaque and it reads the live buffers at run time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from steering.backends.change import relative_change
from steering.backends.vllm.state import SteerState, get_state

OP_NAME = "steer"
_TINY = torch.finfo(torch.float32).tiny
_LIB = None


def _active(st: SteerState, slot: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[M, K]: which applications act on each token (slot [M], rows [M, K], absolute positions [M])."""
    return (rows > 0) & _acting(st, slot, pos, st.K)


def _steered(st: SteerState, h: torch.Tensor, slot: torch.Tensor, rows: torch.Tensor,
             active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h' for tokens h [M, H] (fp32), from their applications; with telemetry on, each token's r as well."""
    gate = active.to(torch.float32) * st.entry_scale[slot]
    norm = st.entry_norm[slot]
    n_delta = torch.zeros_like(h)
    r_delta = torch.zeros_like(h)
    for k in range(st.K):
        vec = st.bank[rows[:, k]]
        n_delta.addcmul_((gate[:, k] * norm[:, k]).unsqueeze(1), vec)
        r_delta.addcmul_((gate[:, k] * ~norm[:, k]).unsqueeze(1), vec)
    has_norm = (active & norm).any(dim=1, keepdim=True)
    before = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
    y = h + n_delta
    after = torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    r = None
    if st.telemetry_every:  # every token: N = 0 gives after = before, R = 0 adds nothing
        r = relative_change(before, after, _dot(n_delta, n_delta), _dot(r_delta, r_delta), _dot(h, r_delta),
                            _dot(n_delta, r_delta))
    y = torch.where(has_norm, y * (before / after), y)
    return y + r_delta, r


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1, keepdim=True)


def _observe(st: SteerState, slots: torch.Tensor, r: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    """Add the acting tokens' r [M, 1] to their slots' sums (``weight`` [M]: which tokens count)."""
    r = r.squeeze(1)
    ones = torch.ones_like(r) if weight is None else weight
    st.tel_sum.index_add_(0, slots, r if weight is None else r * weight)
    st.tel_count.index_add_(0, slots, ones)


def steer_impl(hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor, layer: int) -> None:
    st = get_state()
    if st is None:
        return
    if st.dense:
        t0 = time.perf_counter()
        _steer_dense(st, hidden, residual, positions, layer)
        st.op_seconds += time.perf_counter() - t0
    elif not st.suspended and st.num_steered and st.layer_active[layer]:
        t0 = time.perf_counter()
        _steer_sparse(st, hidden, residual, positions, layer)
        if layer == st.last_layer and st.tel_pending:
            _measure_pending(st)
        st.op_seconds += time.perf_counter() - t0


def _delta_products(plan: _StepPlan) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """||N||^2, ||R||^2 and <N, R> of every layer's precomputed deltas ([L, M, 1] each), once per plan."""
    if plan.products is None:
        n, r = plan.n_delta, plan.r_delta
        plan.products = (None if n is None else _dot(n, n), None if r is None else _dot(r, r),
                         None if n is None or r is None else _dot(n, r))
    return plan.products


def _keep_norms(st: SteerState, plan: _StepPlan, layer: int, before: torch.Tensor, after: torch.Tensor | None,
                hr: torch.Tensor | None) -> None:
    """On a measured step whose deltas were planned, a layer acting on every steered token keeps its norms (and
    <h, R>); :func:`_measure_pending` turns every such layer's into r at once, after the step's last layer."""
    if plan.norms is None:
        plan.norms = torch.zeros(3, st.L, plan.slots.shape[0], 1, dtype=torch.float32, device=before.device)
    plan.norms[0, layer].copy_(before)
    plan.norms[1, layer].copy_(before if after is None else after)  # no normalising application: a = b
    if st.any_norm and st.any_raw:
        if hr is None:  # no other application here (R = 0): <h, R> = 0
            plan.norms[2, layer].zero_()
        else:
            plan.norms[2, layer].copy_(hr)
    st.tel_pending.append(layer)


def _measure_pending(st: SteerState) -> None:
    """r of the layers that kept their norms this step, in one pass over them all (from the plan's products of
    the deltas: ||N||^2, ||R||^2, <N, R> are 0 where nothing of that kind acts)."""
    cached = st.step_cache
    assert cached is not None
    plan, layers = cached[1], st.tel_pending
    assert plan.norms is not None
    n2, r2, nr = _delta_products(plan)
    at = torch.tensor(layers, device=plan.norms.device)
    b, a, hr = plan.norms[:, at]
    if n2 is not None:
        if r2 is not None and nr is not None:
            r = relative_change(b, a, n2[at], r2[at], hr, nr[at])
        else:
            r = relative_change(b, a, n2[at])
    else:
        assert r2 is not None
        r = relative_change(b, r2=r2[at])
    r = r.sum(0).squeeze(1)  # [M] summed over the layers
    st.tel_sum.index_add_(0, plan.slots, r)
    st.tel_count.index_add_(0, plan.slots, torch.full_like(r, len(layers)))
    st.tel_pending = []


_PRECOMPUTE_ELEMENTS = 1 << 21
"""Steps with at most this many (steered tokens x layers x hidden) elements get every layer's deltas at once (8 MiB
in fp32): decode steps. Larger ones (prefill chunks) compute each layer's deltas in its own call."""


@dataclass
class _StepPlan:
    """What every layer of a step shares. Built at the step's first steered layer, and reused by the next steps
    while the batch is the same (same slots, same tokens per request) and the same applications act: decode."""

    n_tokens: int
    idx: torch.Tensor  # [M] the steered tokens
    whole: bool  # the step's tokens are exactly the steered ones, in order: no gather or scatter
    rows: torch.Tensor  # [L, M, K] bank rows of the applications in use
    gate_n: torch.Tensor  # [L, M, K] scale where a normalising application acts, else 0
    gate_r: torch.Tensor  # [L, M, K] the same for the others
    acts: torch.Tensor  # [L, M] some application acts on the token at the layer
    has_norm: torch.Tensor  # [L, M, 1] a normalising one does
    counts: list[tuple[int, int, int]]  # per layer: tokens acted on, with a normalising application, with another
    slots: torch.Tensor  # [M] the steered tokens' slots
    act_counts: np.ndarray  # [L] tokens acted on per layer (the telemetry's count)
    n_delta: torch.Tensor | None = None  # [L, M, H] the summed deltas, for small steps
    r_delta: torch.Tensor | None = None
    norms: torch.Tensor | None = None  # [2, L, M, 1] before and after, kept on measured steps (in-place path)
    products: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None = None
    """||N||^2, ||R||^2, <N, R> of the planned deltas [L, M, 1], on the plan's first measured step."""


def _deltas(st: SteerState, rows: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """sum_k gates[..., k] * bank[rows[..., k]], accumulated in the order of k (the HF hooks' sums)."""
    out = torch.zeros(*rows.shape[:-1], st.H, dtype=torch.float32, device=rows.device)
    for k in range(rows.shape[-1]):
        out.addcmul_(gates[..., k:k + 1], st.bank[rows[..., k]])
    return out


def _acting(st: SteerState, slot: torch.Tensor, pos: torch.Tensor, K: int) -> torch.Tensor:
    """[M, K]: whether application k of each token's request acts at the token's absolute position."""
    mode = st.entry_mode[slot, :K]
    p = pos.unsqueeze(1)
    plen = st.slot_plen[slot].unsqueeze(1)
    pc = pos.clamp(0, st.P - 1)
    k = torch.arange(K, device=pos.device).unsqueeze(0)
    byte = st.pos_bits[slot.unsqueeze(1), k, (pc >> 3).unsqueeze(1)]
    explicit = ((byte >> (pc & 7).to(torch.uint8).unsqueeze(1)) & 1).bool() & (p < st.P)
    return (mode == 0) | ((mode == 1) & (p < plen)) | ((mode == 2) & (p >= plen)) | ((mode == 3) & explicit)


def _build_plan(st: SteerState, idx: torch.Tensor, slot: torch.Tensor, base: torch.Tensor,
                n_tokens: int) -> _StepPlan:
    K, M = base.shape[1], idx.shape[0]
    norm = st.entry_norm[slot, :K]
    gate = base.to(torch.float32) * st.entry_scale[slot, :K]
    rows = st.entry_row[slot, :, :K].transpose(0, 1)  # [L, M, K]
    on = (rows > 0) & base.unsqueeze(0)
    acts = on.any(dim=2)
    has_norm = (on & norm.unsqueeze(0)).any(dim=2)
    has_raw = (on & ~norm.unsqueeze(0)).any(dim=2)
    counts = [tuple(c) for c in torch.stack([acts.sum(1), has_norm.sum(1), has_raw.sum(1)], 1).tolist()]
    plan = _StepPlan(n_tokens, idx, st.all_steered and n_tokens == M, rows, (gate * norm).unsqueeze(0) * on,
                     (gate * ~norm).unsqueeze(0) * on, acts, has_norm.unsqueeze(2), counts, slot,
                     np.array([c[0] for c in counts], dtype=np.int64))
    if M * st.L * st.H <= _PRECOMPUTE_ELEMENTS:
        plan.n_delta = _deltas(st, rows, plan.gate_n) if st.any_norm else None
        plan.r_delta = _deltas(st, rows, plan.gate_r) if st.any_raw else None
    return plan


def _step_plan(st: SteerState, positions: torch.Tensor, n_tokens: int) -> _StepPlan:
    cached = st.step_cache
    if cached is not None and cached[0] == st.step:
        return cached[1]
    idx = st.tok_idx[: st.num_steered]
    slot = st.tok_slot[idx]
    base = _acting(st, slot, positions[idx].to(torch.int64), st.k_used)
    prev = st.plan_cache
    if prev is not None and prev[0] == st.step_key and prev[2].n_tokens == n_tokens and torch.equal(prev[1], base):
        plan = prev[2]
    else:
        plan = _build_plan(st, idx, slot, base, n_tokens)
        st.plan_cache = (st.step_key, base, plan)
    st.step_cache = (st.step, plan)
    st.layer_tokens += plan.act_counts  # once per step
    return plan


def _steer_sparse(st: SteerState, hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor,
                  layer: int) -> None:
    """The arithmetic of :func:`_steered` (and of the HF hooks) on the tokens acted on at this layer only: in
    place when every token of the step is steered (fp32), else gathered and scattered back."""
    plan = _step_plan(st, positions, hidden.shape[0])
    n_act, n_norm, n_raw = plan.counts[layer]
    if n_act == 0:
        return
    every = n_act == plan.acts.shape[1]
    if (every and plan.whole and n_norm == n_act and not n_raw and plan.n_delta is not None
            and residual.dtype == torch.float32):
        h = residual.add_(hidden)  # decode, every row steered by normalising vectors here: 8 ops, no copies
        before = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
        h.add_(plan.n_delta[layer])
        after = torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp_min_(_TINY)
        if st.measure:
            _keep_norms(st, plan, layer, before, after, None)
        h.mul_(before.div_(after))
        hidden.zero_()
        return
    sel = None if every else plan.acts[layer].nonzero().squeeze(1)

    def part(t: torch.Tensor) -> torch.Tensor:
        return t if sel is None else t[sel]

    def delta(pre: torch.Tensor | None, gates: torch.Tensor) -> torch.Tensor:
        if pre is not None:
            return part(pre[layer])
        return _deltas(st, part(plan.rows[layer]), part(gates[layer]))

    dt = residual.dtype
    whole = plan.whole and sel is None
    idx = part(plan.idx)
    if whole and dt == torch.float32:
        h = residual.add_(hidden)
    else:
        h = (hidden[idx].float() + residual[idx].float()).to(dt).float()
    n_delta = delta(plan.n_delta, plan.gate_n) if n_norm else None
    r_delta = delta(plan.r_delta, plan.gate_r) if n_raw else None
    measure = st.measure
    pending = measure and sel is None and (plan.n_delta is not None or plan.r_delta is not None)
    hr = _dot(h, r_delta) if measure and n_delta is not None and r_delta is not None else None
    if measure and not pending:  # a layer acting on some tokens, or deltas not planned (prefill): measured here
        n2 = None if n_delta is None else _dot(n_delta, n_delta)
        r2 = None if r_delta is None else _dot(r_delta, r_delta)
        nr = None if n_delta is None or r_delta is None else _dot(n_delta, r_delta)
    if n_delta is not None:
        before = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
        h.add_(n_delta)
        after = torch.linalg.vector_norm(h, dim=-1, keepdim=True).clamp_min_(_TINY)
        if pending:
            _keep_norms(st, plan, layer, before, after, hr)
        elif measure:
            _observe(st, part(plan.slots), relative_change(before, after, n2, r2, hr, nr))
        ratio = before.div_(after)
        if n_norm == n_act:
            h.mul_(ratio)
        else:  # tokens with only other applications at this layer keep h + 0
            h.copy_(torch.where(part(plan.has_norm[layer]), h * ratio, h))
    elif measure:
        b = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
        if pending:
            _keep_norms(st, plan, layer, b, None, None)
        else:
            _observe(st, part(plan.slots), relative_change(b, r2=r2))
    if r_delta is not None:
        h.add_(r_delta)
    if whole:
        if h.data_ptr() != residual.data_ptr():
            residual.copy_(h)
        hidden.zero_()
    else:
        residual.index_copy_(0, idx, h.to(dt))
        hidden.index_fill_(0, idx, 0)


def _steer_dense(st: SteerState, hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor,
                 layer: int) -> None:
    n = hidden.shape[0]
    slot = st.tok_slot[:n]
    rows = st.entry_row[slot, layer]
    active = _active(st, slot, rows, positions[:n].to(torch.int64))
    any_tok = active.any(dim=1, keepdim=True)
    dt = residual.dtype
    h = (hidden.float() + residual.float()).to(dt).float()
    y, r = _steered(st, h, slot, rows, active)
    residual.copy_(torch.where(any_tok, y.to(dt), residual))
    hidden.masked_fill_(any_tok, 0)
    st.layer_tokens_dev[layer] += any_tok.sum()
    if r is not None:  # every step (a captured graph cannot branch), counted on measured steps (tel_on)
        _observe(st, slot, r, any_tok.squeeze(1).to(torch.float32) * st.tel_on)


def steer_fake(hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor, layer: int) -> None:
    return None


def register_op() -> None:
    """Register the op once per process (vLLM's helper, into our own library fragment)."""
    global _LIB
    if _LIB is not None or hasattr(getattr(torch.ops, "steerserve", None), OP_NAME):
        return
    from torch.library import Library
    from vllm.utils.torch_utils import direct_register_custom_op

    _LIB = Library("steerserve", "FRAGMENT")
    direct_register_custom_op(OP_NAME, steer_impl, mutates_args=["hidden", "residual"], fake_impl=steer_fake,
                              target_lib=_LIB)
