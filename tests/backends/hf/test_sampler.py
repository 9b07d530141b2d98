"""The batched sampler: one row's parameters never break the others."""

from __future__ import annotations

import torch

from steering.backends.hf.sampler import RowSampling, penalize, sample
from steering.sampling import SamplingParams


def test_a_subnormal_temperature_samples_greedily_instead_of_overflowing():
    # found by Schemathesis: temperature 1.18e-38 divided the logits to inf and softmax gave NaN
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    rows = [RowSampling(SamplingParams(temperature=t, logprobs=True), [], torch.Generator().manual_seed(1), [])
            for t in (1.1754943508222875e-38, 1e-6, 0.7)]
    out = sample(logits, rows)
    assert all(isinstance(r, tuple) for r in out), out
    assert [out[i][0] for i in (0, 1)] == logits[:2].argmax(-1).tolist()
    assert all(torch.isfinite(torch.tensor(r[1].logprob)) for r in out)


def row(params: SamplingParams, generated=(), prompt=(), banned=(), allowed=None, seed=None) -> RowSampling:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return RowSampling(params, list(generated), gen, list(banned), list(prompt), allowed)


def test_penalties_follow_the_formula_on_given_logits():
    logits = torch.tensor([[2.0, 1.5, -1.0, 0.5, 1.9, -3.0]])
    p = SamplingParams(temperature=0, frequency_penalty=0.4, presence_penalty=0.3, repetition_penalty=2.0,
                       logit_bias={5: 1.0})
    r = row(p, generated=[0, 0, 2], prompt=[3, 4])
    # by hand: bias token 5 (-3 + 1 = -2); repetition over prompt+output {0, 2, 3, 4}: positive / 2, negative * 2
    # (5 is unseen); then frequency 0.4 x count and presence 0.3 once, over the output {0: 2, 2: 1}
    expected = torch.tensor([[2.0 / 2 - 0.4 * 2 - 0.3, 1.5, -1.0 * 2 - 0.4 - 0.3, 0.5 / 2, 1.9 / 2, -2.0]])
    got = logits.clone()
    penalize(got, [r])
    assert torch.allclose(got, expected)
    assert sample(logits, [r])[0][0] == 1  # token 0 (the raw argmax) fell below token 1


def test_each_penalty_alone_changes_the_chosen_token_as_the_formula_says():
    logits = torch.tensor([[3.0, 2.5, 0.0, 0.0]])
    cases = [(dict(frequency_penalty=0.3), [0, 0], 1),   # 3 - 2 x 0.3 = 2.4 < 2.5
             (dict(frequency_penalty=0.2), [0, 0], 0),   # 3 - 2 x 0.2 = 2.6 > 2.5
             (dict(presence_penalty=0.6), [0, 0], 1),    # 3 - 0.6 = 2.4
             (dict(presence_penalty=0.4), [0, 0], 0),    # 2.6
             (dict(repetition_penalty=1.25), [0], 1),    # 3 / 1.25 = 2.4
             (dict(repetition_penalty=1.1), [0], 0)]     # 2.73
    for kw, gen, want in cases:
        assert sample(logits, [row(SamplingParams(temperature=0, **kw), generated=gen)])[0][0] == want, kw


def test_repetition_penalty_counts_the_prompt_and_multiplies_negative_logits():
    logits = torch.tensor([[-1.0, -1.5, -4.0]])
    # token 0 is in the prompt: -1 * 2 = -2 < -1.5, so token 1 wins; frequency/presence ignore the prompt
    assert sample(logits, [row(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[0])])[0][0] == 1
    assert sample(logits, [row(SamplingParams(temperature=0, presence_penalty=2.0), prompt=[0])])[0][0] == 0


def test_logit_bias_forces_and_bans_tokens_greedy_and_sampled():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    top = logits.argmax(-1).tolist()
    rows = [row(SamplingParams(temperature=0, logit_bias={7: 100.0})),
            row(SamplingParams(temperature=1.0, logit_bias={7: 100.0}), seed=1),
            row(SamplingParams(temperature=0, logit_bias={top[2]: -100.0})),
            row(SamplingParams(temperature=0, logprobs=True))]
    for _ in range(5):
        out = sample(logits, rows)
        assert [out[0][0], out[1][0]] == [7, 7]
        assert out[2][0] != top[2] and out[2][0] == logits[2].masked_fill(torch.arange(50) == top[2], -1e9).argmax()
        assert out[3][0] == top[3]  # a plain neighbour is untouched
    banned = [row(SamplingParams(temperature=2.0, logit_bias={t: -100.0}), seed=s) for s, t in enumerate(top)]
    for _ in range(20):
        assert all(r[0] != t for r, t in zip(sample(logits, banned), top, strict=True))


def test_reported_logprobs_stay_those_of_the_raw_distribution():
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(5))
    out = sample(logits, [row(SamplingParams(temperature=0, logprobs=True, top_logprobs=2, logit_bias={4: 100.0}))])
    tok, lp = out[0]
    raw = torch.log_softmax(logits[0], -1)
    assert tok == 4 and abs(lp.logprob - float(raw[4])) < 1e-6
    assert [t for t, _ in lp.top] == torch.topk(raw, 2).indices.tolist()


def test_a_grammar_mask_is_obeyed_and_wins_over_min_tokens_bans():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(7))
    allowed = torch.zeros(40, dtype=torch.bool)
    allowed[[3, 9, 11]] = True
    only_eos = torch.zeros(40, dtype=torch.bool)
    only_eos[2] = True
    nothing = torch.zeros(40, dtype=torch.bool)
    rows = [row(SamplingParams(temperature=1.0), allowed=allowed, seed=0),
            row(SamplingParams(temperature=0), banned=[2], allowed=only_eos),
            row(SamplingParams(temperature=0), allowed=nothing)]
    for _ in range(10):
        out = sample(logits, rows)
        assert out[0][0] in (3, 9, 11) and out[1][0] == 2
        assert isinstance(out[2], Exception)  # that row fails alone
