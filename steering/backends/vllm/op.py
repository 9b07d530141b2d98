"""The in-graph op ``torch.ops.steerserve.steer(hidden, residual, positions, layer)``.

vLLM's decoder layers pass the residual stream split in two: the block output is h = hidden + residual (the next
layer's fused add + RMSNorm forms it). After each armed layer the op computes, for every token with an active
application there,

    h' = (h + N) * ||h|| / ||h + N|| + R      (N: the sum of the normalising applications, R: the others)

exactly as the Hugging Face backend does on the block output, and writes ``residual <- h'``, ``hidden <- 0``, so
the next fused add sees h'. Tokens with nothing active keep their exact bits.

Two implementations of the same arithmetic (fp32, h rounded to the model dtype first, as the HF hooks see it):

* sparse: gathers the step's steered tokens (host counts from the fill say how many, and which layers act) and
  skips layers and steps with nothing to do. For CPU and eager GPU runs.
* dense: computes every token of the step with masks and reads no host state, so it can be captured in a CUDA
  graph and replayed with new buffers; unsteered tokens are selected back unchanged.

The op is registered with ``direct_register_custom_op`` (it mutates hidden and residual; its fake is a no-op), so
Dynamo and Inductor keep it opaque and it reads the live buffers at run time.
"""

from __future__ import annotations

import torch

from steering.backends.vllm.state import SteerState, get_state

OP_NAME = "steer"
_LIB = None


def _active(st: SteerState, slot: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[M, K]: which applications act on each token (slot [M], rows [M, K], absolute positions [M])."""
    mode = st.entry_mode[slot]
    p = pos.unsqueeze(1)
    plen = st.slot_plen[slot].unsqueeze(1)
    pc = pos.clamp(0, st.P - 1)
    k = torch.arange(st.K, device=pos.device).unsqueeze(0)
    byte = st.pos_bits[slot.unsqueeze(1), k, (pc >> 3).unsqueeze(1)]
    explicit = ((byte >> (pc & 7).to(torch.uint8).unsqueeze(1)) & 1).bool() & (p < st.P)
    return (rows > 0) & ((mode == 0) | ((mode == 1) & (p < plen)) | ((mode == 2) & (p >= plen))
                         | ((mode == 3) & explicit))


def _steered(st: SteerState, h: torch.Tensor, slot: torch.Tensor, rows: torch.Tensor,
             active: torch.Tensor) -> torch.Tensor:
    """h' for tokens h [M, H] (fp32), from their applications."""
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
    y = torch.where(has_norm, y * (before / after), y)
    return y + r_delta


def steer_impl(hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor, layer: int) -> None:
    st = get_state()
    if st is None:
        return
    if st.dense:
        _steer_dense(st, hidden, residual, positions, layer)
    elif not st.suspended and st.num_steered and st.layer_active[layer]:
        _steer_sparse(st, hidden, residual, positions, layer)


def _step_tokens(st: SteerState, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What every layer of this step shares: the steered tokens, their slots, the position rules and the gates of
    the applications in use (``k_used`` of them), computed at the step's first steered layer."""
    cached = st.step_cache
    if cached is not None and cached[0] == st.step:
        return cached[1]
    K = st.k_used
    idx = st.tok_idx[: st.num_steered]
    slot = st.tok_slot[idx]
    pos = positions[idx].to(torch.int64)
    mode = st.entry_mode[slot, :K]
    p = pos.unsqueeze(1)
    plen = st.slot_plen[slot].unsqueeze(1)
    pc = pos.clamp(0, st.P - 1)
    k = torch.arange(K, device=pos.device).unsqueeze(0)
    byte = st.pos_bits[slot.unsqueeze(1), k, (pc >> 3).unsqueeze(1)]
    explicit = ((byte >> (pc & 7).to(torch.uint8).unsqueeze(1)) & 1).bool() & (p < st.P)
    base = (mode == 0) | ((mode == 1) & (p < plen)) | ((mode == 2) & (p >= plen)) | ((mode == 3) & explicit)
    norm = st.entry_norm[slot, :K]
    gate = base.to(torch.float32) * st.entry_scale[slot, :K]
    out = (idx, slot, base, gate * norm, gate * ~norm, base & norm)
    st.step_cache = (st.step, out)
    return out


def _steer_sparse(st: SteerState, hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor,
                  layer: int) -> None:
    idx, slot, base, gate_n, gate_r, base_norm = _step_tokens(st, positions)
    rows = st.entry_row[slot, layer, : st.k_used]
    on = rows > 0
    any_tok = (base & on).any(dim=1)
    count = int(any_tok.sum())
    if count == 0:
        return
    if count < any_tok.shape[0]:  # some steered tokens have nothing active at this layer: leave their bits
        sel = any_tok.nonzero().squeeze(1)
        idx, rows, on, gate_n, gate_r, base_norm = idx[sel], rows[sel], on[sel], gate_n[sel], gate_r[sel], \
            base_norm[sel]
    dt = residual.dtype
    h = (hidden[idx].float() + residual[idx].float()).to(dt).float()
    # the arithmetic of _steered (and of the HF hooks), over the applications in use only
    y = h
    if st.any_norm:
        n_delta = torch.zeros_like(h)
        for k in range(rows.shape[1]):
            n_delta.addcmul_((gate_n[:, k] * on[:, k]).unsqueeze(1), st.bank[rows[:, k]])
        has_norm = (base_norm & on).any(dim=1, keepdim=True)
        before = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
        y = h + n_delta
        after = torch.linalg.vector_norm(y, dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        y = torch.where(has_norm, y * (before / after), y)
    if st.any_raw:
        r_delta = torch.zeros_like(h)
        for k in range(rows.shape[1]):
            r_delta.addcmul_((gate_r[:, k] * on[:, k]).unsqueeze(1), st.bank[rows[:, k]])
        y = y + r_delta
    residual.index_copy_(0, idx, y.to(dt))
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
    y = _steered(st, h, slot, rows, active).to(dt)
    residual.copy_(torch.where(any_tok, y, residual))
    hidden.masked_fill_(any_tok, 0)


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
