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
