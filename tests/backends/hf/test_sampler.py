"""The batched sampler: one row's parameters never break the others."""

from __future__ import annotations

import torch

from steering.backends.hf.sampler import RowSampling, sample
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
