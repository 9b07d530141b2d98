"""Integrated gradients over whole packed sequences: every token of a prompt and of its answers is attributed.

A row packs a prompt with its answers (:mod:`steering.tasks.packing`); its objective is a weighted sum of the
answers' summed log-probabilities, e.g. log P(preferred | prompt) - log P(dispreferred | prompt) with weights
+1 and -1 (GrAInS). All token embeddings of the row move together along the straight path from the baseline,
so the prompt's scores are the contrastive attribution of the shared prompt and each answer's scores are its
own tokens' share. Path points of many rows are batched up to the chunk token budget and each chunk needs one
forward and one backward (rows are independent, so the gradient of the chunk's summed objective is each row's
own gradient).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from steering.engine.jobs import JobContext, Progress
from steering.tasks.attribution.gradients import IntegrationMethod, integration_points
from steering.tasks.packing import Segment, pack, targets
from steering.tasks.scoring import group_logprob_grad, packed_embeddings, packed_forward

Baseline = Literal["zeros", "pad", "eos"]
Precision = Literal["auto", "model", "bfloat16"]


@functools.cache
def _native_bf16(device_type: str) -> bool:
    """Whether matrix products in bfloat16 run natively (faster than float32) on this device."""
    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device_type == "cpu":
        try:  # oneDNN's check: AVX512-BF16 or AMX
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(lm, precision: Precision) -> Literal["model", "bfloat16"]:
    """``auto``: bfloat16 matrix products for a float32 model where the hardware has them, else the model's own
    dtype. Only a float32 model is ever run in bfloat16 (half precision already is; float64 is asked for)."""
    if lm.dtype != torch.float32:
        return "model"
    if precision == "auto":
        return "bfloat16" if _native_bf16(lm.device.type) else "model"
    return precision


class _AttentionInModelPrecision(TorchFunctionMode):
    """Runs ``scaled_dot_product_attention`` with autocast off, on its inputs in float32 (at least).

    CPU autocast puts attention in bfloat16, and PyTorch's bfloat16 flash-attention backward on CPU is 7x slower
    than its float32 one (38 ms against 5.5 ms per layer on a 2048-token chunk of the default model): it took a
    third of a bfloat16 integrated-gradients step and all of the matrix products' gain. Attention is a small
    share of the arithmetic, so float32 here costs nothing and keeps the softmax exact. A torch-function mode is
    thread-local and lives only inside :func:`compute_context`, so no other forward (generation, other jobs)
    sees it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)

        def up(a):
            return a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() and a.element_size() < 4 else a

        with torch.autocast(device_type=_device_type(args, kwargs), enabled=False):
            return func(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()})


def _device_type(args, kwargs) -> str:
    first = args[0] if args else kwargs["query"]
    return first.device.type


def compute_context(lm, precision: Literal["model", "bfloat16"]):
    """``bfloat16``: the model's matrix products in bfloat16 under autocast, with float32 accumulation (weights stay
    as loaded; norms, softmax and the gradients' sums stay in float32, and on a CPU attention too: see
    :class:`_AttentionInModelPrecision`). ``model``: nothing changes."""
    if precision == "model":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type=lm.device.type, dtype=torch.bfloat16))
    if lm.device.type == "cpu":  # GPUs' bfloat16 attention kernels are their fast ones
        stack.enter_context(_AttentionInModelPrecision())
    return stack


def _units(lengths: Sequence[int], points: Sequence[int], budget: int) -> list[list[tuple[int, list[int]]]]:
    """Chunks of (row, path points): a row's points split to fit, rows batched together, longest rows first so
    that a chunk's rows have similar lengths (little padding)."""
    n = len(points)
    units: list[tuple[int, list[int]]] = []
    for i in sorted(range(len(lengths)), key=lambda r: (-lengths[r], r)):
        L = lengths[i]
        m = max(1, min(n, budget // max(1, L)))
        units.extend((i, list(points[a:a + m])) for a in range(0, n, m))
    out: list[list[tuple[int, list[int]]]] = []
    cur: list[tuple[int, list[int]]] = []
    longest = count = 0
    for u in units:
        L, k = lengths[u[0]], len(u[1])
        if cur and max(longest, L) * (count + k) > budget:
            out.append(cur)
            cur, longest, count = [], 0, 0
        cur.append(u)
        longest, count = max(longest, L), count + k
    if cur:
        out.append(cur)
    return out


ARITHMETIC = 2
"""Part of every cached score's key: raised whenever the arithmetic changes, so that scores a directory cache
kept from older code are not served (2: attention in float32 on CPUs under bfloat16, the LM head's gradient in
closed form)."""

EXACT_BELOW = 0.05
"""With ``precision`` bfloat16, path points closer to the zero baseline than this run in the model's own dtype.
There the embeddings are smaller than RMSNorm's epsilon scale, the first layers amplify rounding, and bfloat16
rounding alone re-rolls the token choice (docs/experiments.md §4): on 60 TruthfulQA rows of the default model,
bfloat16 at every point kept 41/60 float32 selections, float32 below 0.05 kept 57/60 (the same for 0.1-0.2)."""


def point_groups(alphas: torch.Tensor, mode: Literal["model", "bfloat16"],
                 exact_below: float = EXACT_BELOW) -> list[tuple[list[int], Literal["model", "bfloat16"]]]:
    """The path points (indices) each precision runs: everything in the model's dtype, or with ``bfloat16`` the
    points below ``exact_below`` in the model's dtype and the rest in bfloat16."""
    idx = list(range(len(alphas)))
    if mode == "model":
        return [(idx, "model")]
    exact = [i for i in idx if float(alphas[i]) < exact_below]
    fast = [i for i in idx if float(alphas[i]) >= exact_below]
    groups: list[tuple[list[int], Literal["model", "bfloat16"]]] = [(exact, "model"), (fast, "bfloat16")]
    return [(g, m) for g, m in groups if g]


def integrated_gradients(ctx: JobContext, rows: Sequence[Sequence[Segment]], weights: Sequence[Sequence[float]],
                         n_steps: int = 20, method: IntegrationMethod = "gausslegendre",
                         baseline: Baseline = "zeros", stage: str = "attribution", precision: Precision = "model",
                         exact_below: float = EXACT_BELOW):
    """Job generator: per row, token scores [L_row] (float32, CPU; signed sum over the hidden dimension).

    ``weights[r][j]`` weighs the summed log-probability of segment ``j`` of row ``r`` in the objective (roots
    are not scored; their weight is ignored). ``precision``: see :func:`resolve_precision`; with bfloat16 the path
    points below ``exact_below`` still run in the model's dtype (:func:`point_groups`). The objective's gradient
    at the final hidden states is taken in closed form (:func:`~steering.tasks.scoring.group_logprob_grad`; its
    two products with the LM head in the point's precision, the softmax in float32 at least) and carried back
    through the decoder by autograd."""
    lm = ctx.lm
    mode = resolve_precision(lm, precision)
    emb = lm.model.get_input_embeddings()
    pad = lm.pad_id
    alphas, qw = integration_points(n_steps, method)
    acc_dtype = torch.float64 if lm.dtype == torch.float64 else torch.float32
    lengths = [sum(len(s.ids) for s in r) for r in rows]
    grads = [torch.zeros(L, lm.hidden_size, dtype=acc_dtype, device=lm.device) for L in lengths]
    base_id = {"pad": pad, "eos": ctx.lm.tokenizer.eos_token_id}.get(baseline)
    plans = [(_units(lengths, points, ctx.chunk_tokens), how)
             for points, how in point_groups(alphas, mode, exact_below if baseline == "zeros" else 0.0)]
    done = 0
    for plan, how in plans:
        for chunk in plan:
            sub, a_list, w_list, owner = [], [], [], []
            for i, points in chunk:
                for a in points:
                    sub.append(rows[i])
                    a_list.append(float(alphas[a]))
                    w_list.append(float(qw[a]))
                    owner.append(i)
            batch = pack(sub, pad, lm.device)
            tgt = targets(batch, sub)
            x = packed_embeddings(ctx, batch)
            base = torch.zeros_like(x) if base_id is None else emb(torch.full_like(batch.ids, int(base_id))).detach()
            a_t = torch.tensor(a_list, device=lm.device, dtype=x.dtype).view(-1, 1, 1)
            gw = torch.tensor([weights[owner[r]][j] * w_list[r] for r, j in tgt[3]], device=lm.device,
                              dtype=acc_dtype)
            with torch.enable_grad():
                e = (base + a_t * (x - base)).requires_grad_(True)
                with compute_context(lm, how):
                    hidden = packed_forward(ctx, batch, embeds=e)
                states, at_states = group_logprob_grad(lm, hidden, tgt, gw,
                                                       torch.bfloat16 if how == "bfloat16" else None)
                (g,) = torch.autograd.grad(states, e, grad_outputs=at_states)
            for r, i in enumerate(owner):
                grads[i] += g[r, : lengths[i]].to(acc_dtype)
            del e, hidden, states, at_states, g
            done += sum(len(points) for _, points in chunk)
            yield Progress(done, n_steps * len(rows), stage)
    out = []
    for i, row in enumerate(rows):
        one = pack([row], pad, lm.device)
        x = packed_embeddings(ctx, one)[0].to(acc_dtype)
        base = torch.zeros_like(x) if base_id is None else \
            emb(torch.full_like(one.ids[0], int(base_id))).detach().to(acc_dtype)
        out.append((grads[i] * (x - base)).sum(-1).to("cpu", torch.float32))
    return out


def cached_integrated_gradients(ctx: JobContext, rows: Sequence[Sequence[Segment]],
                                weights: Sequence[Sequence[float]], n_steps: int = 20,
                                method: IntegrationMethod = "gausslegendre", baseline: Baseline = "zeros",
                                stage: str = "attribution", precision: Precision = "model", cache=None):
    """:func:`integrated_gradients` through a score cache (:mod:`steering.tasks.attribution.cache`; default: the
    process's): rows already attributed with the same model, objective and settings are not recomputed."""
    from steering.tasks.attribution import cache as score_cache

    store = score_cache.SCORES if cache is None else cache
    fp = score_cache.model_fingerprint(ctx.lm)
    settings: dict[str, object] = {"n_steps": n_steps, "method": method, "baseline": baseline,
                                   "precision": resolve_precision(ctx.lm, precision), "dtype": str(ctx.lm.dtype),
                                   "arithmetic": ARITHMETIC}
    if settings["precision"] == "bfloat16" and baseline == "zeros":
        settings["exact_below"] = EXACT_BELOW
    keys = [score_cache.row_key(fp, r, w, settings) for r, w in zip(rows, weights, strict=True)]
    out: list[torch.Tensor | None] = [store.get(k) for k in keys]
    todo = [i for i, s in enumerate(out) if s is None]
    if todo:
        fresh = yield from integrated_gradients(ctx, [rows[i] for i in todo], [weights[i] for i in todo], n_steps,
                                                method, baseline, stage, precision)
        for i, s in zip(todo, fresh, strict=True):
            store.put(keys[i], s)
            out[i] = s
    else:
        yield Progress(1, 1, stage)
    return out
