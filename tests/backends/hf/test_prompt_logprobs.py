"""Prompt log-probabilities and prompt-only (``max_tokens`` 0) requests on the Hugging Face engine: equal to a
direct forward's log_softmax, steered as in generation, the same however the projection or the prompt is split."""

from __future__ import annotations

import pytest
import torch

from steering.backends.hf.prompt_logprobs import prompt_logprobs, score_range
from steering.engine import GenerationRequest
from steering.sampling import SamplingParams
from steering.spec import SteeringSpec
from tests.backends.hf.test_engine import greedy, ids, rand_vector

TEXT = "Hello world! How are you today? I am fine, thank you."


def first_output(engine, prompt, sampling, steering=None):
    outs = list(engine.submit(GenerationRequest(prompt, sampling, steering)))
    assert all(o.prompt_logprobs is None for o in outs[1:])
    return outs


def reference(lm, prompt, k):
    lp = torch.log_softmax(lm.model(input_ids=torch.tensor([prompt])).logits[0].float(), -1)
    chosen = [float(lp[j - 1, prompt[j]]) for j in range(1, len(prompt))]
    tops = [torch.topk(lp[j - 1], k) for j in range(1, len(prompt))] if k else None
    return chosen, tops


@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_prompt_logprobs_equal_a_direct_forward(tiny_lm, make_engine, k, use_kv_cache):
    engine = make_engine(use_kv_cache=use_kv_cache)
    p = ids(tiny_lm, TEXT)
    outs = first_output(engine, p, greedy(3, prompt_logprobs=k))
    plp = outs[0].prompt_logprobs
    assert plp is not None and len(plp) == len(p) and plp[0] is None
    chosen, tops = reference(tiny_lm, p, k)
    assert [e.token_id for e in plp[1:]] == p[1:]
    assert torch.allclose(torch.tensor([e.logprob for e in plp[1:]]), torch.tensor(chosen), atol=1e-4)
    for e, top in zip(plp[1:], tops or [None] * len(chosen), strict=True):
        if top is None:
            assert e.top == []
        else:
            assert [t for t, _ in e.top] == top.indices.tolist()
            assert torch.allclose(torch.tensor([v for _, v in e.top]), top.values, atol=1e-4)
    assert sum(len(o.token_ids) for o in outs) == 3


def test_steered_prompt_logprobs_are_those_of_steered_generation(tiny_lm, make_engine):
    """Scoring prompt + the tokens a steered request generated gives back their generation log-probabilities."""
    engine = make_engine()
    steer = SteeringSpec.single(rand_vector(tiny_lm, 2), scale=3.0)
    p = ids(tiny_lm, TEXT)
    gen = engine.generate(p, greedy(5, logprobs=True), steer)
    outs = first_output(engine, p + gen.token_ids, SamplingParams(max_tokens=0, prompt_logprobs=0), steer)
    scored = [e.logprob for e in outs[0].prompt_logprobs[-5:]]
    assert torch.allclose(torch.tensor(scored), torch.tensor([lp.logprob for lp in gen.logprobs]), atol=1e-4)
    plain = first_output(engine, p + gen.token_ids, SamplingParams(max_tokens=0, prompt_logprobs=0))
    assert not torch.allclose(torch.tensor([e.logprob for e in plain[0].prompt_logprobs[-5:]]), torch.tensor(scored))


def test_split_projection_and_split_ranges_give_the_same_entries(tiny_lm):
    p = ids(tiny_lm, TEXT)
    hidden = tiny_lm.model.base_model(input_ids=torch.tensor([p])).last_hidden_state[0]
    whole = prompt_logprobs(tiny_lm, hidden, p, 2)
    same(prompt_logprobs(tiny_lm, hidden, p, 2, max_elements=3 * tiny_lm.vocab_size), whole)
    chunks = [None] + [e for a, b in ((0, 5), (5, 6), (6, len(p))) for e in score_range(tiny_lm, hidden[a:b], p, a, 2)]
    same(chunks, whole)


def same(a, b):
    """Equal entries, up to float32 rounding (a matrix product's sums depend on its shape)."""
    assert len(a) == len(b) and a[0] is None and b[0] is None
    for x, y in zip(a[1:], b[1:], strict=True):
        assert x.token_id == y.token_id and [t for t, _ in x.top] == [t for t, _ in y.top]
        assert torch.allclose(torch.tensor([x.logprob] + [v for _, v in x.top]),
                              torch.tensor([y.logprob] + [v for _, v in y.top]), atol=1e-5)


def test_max_tokens_zero_scores_the_prompt_only_beside_generating_rows(tiny_lm, make_engine):
    engine = make_engine()
    p = ids(tiny_lm, TEXT)
    alone = engine.generate(p, greedy(8)).token_ids
    handles = [engine.submit(GenerationRequest(p, SamplingParams(max_tokens=0, prompt_logprobs=1))),
               engine.submit(GenerationRequest(p, greedy(8)))]
    outs = list(handles[0])
    assert len(outs) == 1 and outs[0].finished and outs[0].finish_reason == "length"
    assert outs[0].token_ids == [] and outs[0].num_generated_tokens == 0
    assert len(outs[0].prompt_logprobs) == len(p)
    assert handles[1].result().token_ids == alone
    assert engine.stats().idle or engine.drain(5)
