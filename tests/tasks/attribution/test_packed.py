"""Integrated gradients over whole packed sequences."""

from __future__ import annotations

import pytest
import torch

from steering.backends.hf import run_job
from steering.tasks.attribution.gradients import integration_points
from steering.tasks.attribution.packed import integrated_gradients
from steering.tasks.builders import encode
from steering.tasks.builders.registry import BuilderParams
from steering.tasks.packing import answer_rows
from tests.tiny import EXAMPLES, plain_logprob


def _reference_ig(lm, p, a, b, n):
    """Contrastive IG of log P(a|p) - log P(b|p) over all tokens, from plain forwards (zero baseline)."""
    emb = lm.model.get_input_embeddings()
    x = [emb(torch.tensor(t)).detach() for t in (p, a, b)]
    alphas, weights = integration_points(n, "gausslegendre")
    acc = [torch.zeros_like(t) for t in x]
    for alpha, w in zip(alphas.tolist(), weights.tolist()):
        e = [(alpha * t).requires_grad_(True) for t in x]
        f = plain_logprob(lm, p, a, torch.cat([e[0], e[1]])) - plain_logprob(lm, p, b, torch.cat([e[0], e[2]]))
        for g_acc, g in zip(acc, torch.autograd.grad(f, e)):
            g_acc += w * g
    return torch.cat([(g * t).sum(-1) for g, t in zip(acc, x)])


def test_packed_ig_equals_plain_reference_and_is_complete(lm64):
    tok = lm64.tokenizer
    data = encode(lm64, EXAMPLES[:3], BuilderParams())
    rows = [answer_rows(e.prompt, [e.preferred, e.dispreferred]) for e in data]
    scores = run_job(lambda ctx: integrated_gradients(ctx, rows, [[0, 1, -1]] * 3, n_steps=16), lm64,
                     chunk_tokens=96)
    for e, s in zip(data, scores):
        ref = _reference_ig(lm64, e.prompt, e.preferred, e.dispreferred, 16)
        torch.testing.assert_close(s.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        assert float(s[len(e.prompt) + len(e.preferred) - 1]) == 0.0  # an answer's last token predicts nothing
    # completeness from the EOS baseline (the zero embedding is ill-conditioned under RMSNorm)
    e = data[0]
    scores = run_job(lambda ctx: integrated_gradients(ctx, rows[:1], [[0, 1, -1]], n_steps=128, baseline="eos"),
                     lm64)
    emb = lm64.model.get_input_embeddings()
    eos = emb(torch.tensor(tok.eos_token_id))

    def f(base: bool) -> float:
        parts = [emb(torch.tensor(t)) if not base else eos.expand(len(t), -1) for t in (e.prompt, e.preferred,
                                                                                         e.dispreferred)]
        with torch.no_grad():
            return float(plain_logprob(lm64, e.prompt, e.preferred, torch.cat(parts[:2]))
                         - plain_logprob(lm64, e.prompt, e.dispreferred, torch.cat([parts[0], parts[2]])))

    gap = f(False) - f(True)
    assert abs(gap) > 0.1
    assert float(scores[0].sum()) == pytest.approx(gap, rel=1e-3, abs=1e-3)


def test_bfloat16_attribution_agrees_with_float32_and_auto_picks_the_hardware(tiny_lm, lm64):
    from steering.tasks.attribution.packed import _native_bf16, resolve_precision

    data = encode(tiny_lm, EXAMPLES, BuilderParams())
    rows = [answer_rows(e.prompt, [e.preferred, e.dispreferred]) for e in data]
    w = [[0, 1, -1]] * len(rows)
    ref = run_job(lambda ctx: integrated_gradients(ctx, rows, w, 8), tiny_lm)
    bf = run_job(lambda ctx: integrated_gradients(ctx, rows, w, 8, precision="bfloat16"), tiny_lm)
    for a, b in zip(ref, bf, strict=True):
        assert b.dtype == torch.float32 and b.shape == a.shape and not torch.equal(a, b)
        assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.98
        assert abs(float(b.sum() - a.sum())) < 0.1 * float(a.abs().sum())  # completeness holds about as well
    assert resolve_precision(tiny_lm, "auto") == ("bfloat16" if _native_bf16("cpu") else "model")
    assert resolve_precision(tiny_lm, "model") == "model"
    assert resolve_precision(lm64, "bfloat16") == resolve_precision(lm64, "auto") == "model"  # float64 is asked for


def test_bfloat16_runs_the_points_near_the_zero_baseline_in_the_models_dtype(tiny_lm):
    """Near the zero baseline the embeddings are below RMSNorm's epsilon scale and rounding is amplified, so those
    path points stay in float32: with every point below the threshold the result is float32's bit for bit, with
    none it is all-bfloat16's, and the default sits much closer to float32 than all-bfloat16 does."""
    from steering.tasks.attribution.packed import EXACT_BELOW, point_groups

    alphas, _ = integration_points(8, "gausslegendre")
    groups = point_groups(alphas, "bfloat16")
    assert [how for _, how in groups] == ["model", "bfloat16"]
    assert all(float(alphas[i]) < EXACT_BELOW for i in groups[0][0]) and sorted(groups[0][0] + groups[1][0]) == \
        list(range(8))
    data = encode(tiny_lm, EXAMPLES, BuilderParams())
    rows = [answer_rows(e.prompt, [e.preferred, e.dispreferred]) for e in data]
    w = [[0, 1, -1]] * len(rows)

    def ig(**kw):
        return torch.cat(run_job(lambda ctx: integrated_gradients(ctx, rows, w, 8, **kw), tiny_lm))

    fp32, default = ig(), ig(precision="bfloat16")
    assert torch.equal(ig(precision="bfloat16", exact_below=1.0), fp32)
    all_bf16 = ig(precision="bfloat16", exact_below=0.0)
    assert not torch.equal(default, fp32) and not torch.equal(default, all_bf16)
    assert float((default - fp32).abs().sum()) < 0.5 * float((all_bf16 - fp32).abs().sum())


def test_bfloat16_context_keeps_attention_in_float32_and_ends_with_its_block(tiny_lm):
    """Under ``compute_context(..., "bfloat16")`` matrix products run in bfloat16 but attention in float32 (CPU's
    bfloat16 flash-attention backward is several times slower than float32's), and neither outlives the block."""
    import torch.nn.functional as F

    from steering.tasks.attribution.packed import compute_context

    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    mask = torch.zeros(2, 1, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # plain autocast: attention in bfloat16
        assert F.scaled_dot_product_attention(q, k, v, attn_mask=mask).dtype == torch.bfloat16
    with compute_context(tiny_lm, "bfloat16"):
        assert (torch.ones(3, 3) @ torch.ones(3, 3)).dtype == torch.bfloat16
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=0, atol=0)
        low = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask)
        assert low.dtype == torch.float32  # bfloat16 inputs are raised, not lowered further
    with torch.autocast("cpu", enabled=False):
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert not torch.is_autocast_enabled("cpu") and torch._C._len_torch_function_stack() == 0
    assert (torch.ones(3, 3) @ torch.ones(3, 3)).dtype == torch.float32
