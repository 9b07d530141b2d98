"""Scheduling: background generations (an evaluation's) hold at most their share of the batch, so interactive
requests keep flowing beside them."""

from __future__ import annotations

import time

from steering.engine import GenerationRequest
from steering.sampling import SamplingParams


def test_background_requests_keep_to_their_share(tiny_lm, make_engine):
    engine = make_engine(max_batch_size=4, background_share=0.5)
    prompt = tiny_lm.inputs.encode_text("The quick brown fox")
    long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    background = [engine.submit(GenerationRequest(prompt, long, priority=1)) for _ in range(6)]
    deadline = time.monotonic() + 10
    while engine.stats().running < 2:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.1)
    assert engine.stats().running == 2  # background: half the batch, though 6 wait
    t0 = time.monotonic()
    interactive = engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    waited = time.monotonic() - t0
    assert interactive.finish_reason == "length"
    assert engine.stats().running == 2 and engine.stats().waiting == 4  # the background rows still run
    for h in background:
        h.cancel()
    assert engine.drain(10)
    # an 8-token interactive request did not wait for any 400-token background request to finish
    assert waited < 5
