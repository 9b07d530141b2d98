"""Packed rows scored in one forward equal plain forwards, on several architectures."""

from __future__ import annotations

import pytest
import torch

from steering.backends.hf import run_job
from steering.backends.hf.loading import load_model
from steering.tasks.scoring import score_answers
from tests.tiny import build_model, plain_logprob


@pytest.fixture(scope="module", params=["llama", "qwen2-sliding", "gpt2"])
def arch_lm(request, tmp_path_factory):
    d = build_model(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)
    return load_model(str(d), device="cpu", dtype="float32")


def test_packed_scores_equal_plain_forwards(arch_lm):
    """A prompt packed with several answers scores each exactly as a separate plain forward would (positions
    restart after the prompt for every answer; sliding windows kept)."""
    tok = arch_lm.tokenizer
    prompt = tok("Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12")["input_ids"]
    answers = [tok(t, add_special_tokens=False)["input_ids"] for t in (" 13 14 15 16 17 18", " Paris", " a b")]
    items = [(prompt, answers), (prompt[:4], answers[1:])]
    res = run_job(lambda ctx: score_answers(ctx, items), arch_lm, chunk_tokens=40)  # forces several chunks
    with torch.no_grad():
        for (p, ans), scored in zip(items, res):
            ref = [float(plain_logprob(arch_lm, p, a)) for a in ans]
            assert scored.logprobs == pytest.approx(ref, rel=1e-4, abs=1e-4)
            assert scored.lengths == [len(a) for a in ans]


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_closed_form_logprob_gradient_equals_autograd(lm64, softcap):
    """group_logprob_grad's closed-form gradient at the final hidden states equals autograd's through the LM head
    and log-softmax (float64; with and without a logit soft-cap, whose derivative the closed form applies)."""
    import copy

    from steering.tasks.packing import answer_rows, pack, targets
    from steering.tasks.scoring import group_logprob_grad, group_logprobs

    lm = copy.copy(lm64)
    lm._softcap = softcap
    tok = lm.tokenizer
    rows = [answer_rows(tok("The quick brown fox")["input_ids"], [tok(" jumps over", add_special_tokens=False)
                                                                  ["input_ids"], tok(" sat", add_special_tokens=False)
                                                                  ["input_ids"]]),
            answer_rows(tok("Hello")["input_ids"], [tok(" world", add_special_tokens=False)["input_ids"]])]
    batch = pack(rows, lm.pad_id, lm.device)
    tgt = targets(batch, rows)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(*batch.ids.shape, lm.hidden_size, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    (ref,) = torch.autograd.grad((group_logprobs(lm, hidden, tgt) * weights).sum(), hidden)
    states, at_states = group_logprob_grad(lm, hidden, tgt, weights)
    assert states.shape == at_states.shape == (len(tgt[0]), lm.hidden_size) and at_states.dtype == torch.float64
    (got,) = torch.autograd.grad(states, hidden, grad_outputs=at_states)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert float(ref.abs().max()) > 0.01
