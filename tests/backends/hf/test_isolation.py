"""One request cannot fail its neighbours: a bad row in a batch fails alone, the others' outputs are unchanged."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
import torch

from steering.engine import GenerationRequest, Progress
from steering.errors import RequestFailedError, SteeringOverflowError
from steering.sampling import SamplingParams
from steering.spec import SteeringApplication, SteeringSpec
from steering.vectors import SteeringVector

PROMPTS = ["The quick brown fox", "What is the capital of France?", "Numbers: 0 1 2 3", "I love this movie"]


def greedy(n: int = 10) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


@contextmanager
def engine_held(engine):
    """Keep the engine's thread inside a job chunk, so that what is submitted meanwhile arrives together."""
    gate, inside = threading.Event(), threading.Event()

    def hold(ctx):
        inside.set()
        gate.wait(10)
        yield Progress(1, 1, "holding")

    job = engine.submit_job(hold, "hold")
    assert inside.wait(10)
    try:
        yield
    finally:
        gate.set()
        job.result(10)


def test_a_scale_that_overflows_the_dtype_is_refused_before_it_runs(tiny_lm, make_engine):
    engine = make_engine()
    vec = SteeringVector({1: torch.full((tiny_lm.hidden_size,), 10.0)})
    with pytest.raises(SteeringOverflowError) as err:
        engine.submit(GenerationRequest(tiny_lm.inputs.encode_text(PROMPTS[0]), greedy(),
                                        SteeringSpec.single(vec, scale=1e38)))
    assert err.value.param == "steering.vectors[0].scale"
    assert engine.stats().idle


def test_a_row_whose_steering_overflows_at_run_time_fails_alone(tiny_lm, make_engine):
    engine = make_engine()
    prompts = [tiny_lm.inputs.encode_text(t) for t in PROMPTS]
    alone = [engine.generate(p, greedy()).token_ids for p in prompts]
    # Each application is finite at submission, but together they overflow float32 inside the model (Inf, then
    # NaN through the next RMSNorm).
    huge = SteeringVector({1: torch.full((tiny_lm.hidden_size,), 3e38)})
    spec = SteeringSpec([SteeringApplication(huge), SteeringApplication(huge)])
    handles = [engine.submit(GenerationRequest(p, greedy())) for p in prompts[:2]]
    bad = engine.submit(GenerationRequest(prompts[2], greedy(), spec))
    handles += [engine.submit(GenerationRequest(p, greedy())) for p in prompts[3:]]
    with pytest.raises(SteeringOverflowError, match="Inf/NaN"):
        bad.result()
    got = [h.result().token_ids for h in handles]
    assert got == [alone[0], alone[1], alone[3]]
    # its KV-cache slot was cleared: the requests that take the slots next are unaffected too
    again = [engine.submit(GenerationRequest(p, greedy())) for p in prompts]
    assert [h.result().token_ids for h in again] == alone
    assert engine.stats().idle


def test_a_prefill_that_fails_for_one_row_is_retried_row_by_row(tiny_lm, make_engine, monkeypatch):
    """Fault injection: the batched prefill raises whenever the poisoned prompt is in it; the engine then
    prefills each row alone, and only the poisoned request fails."""
    engine = make_engine()
    prompts = [tiny_lm.inputs.encode_text(t) for t in PROMPTS]
    alone = [engine.generate(p, greedy()).token_ids for p in prompts]
    poison = prompts[1][0]
    forward = engine.runner.forward

    def faulty(**kw):
        ids = kw.get("input_ids")
        if kw.get("kv") == "prefill" and ids is not None and bool((ids[:, 0] == poison).any()):
            raise RuntimeError("injected fault")
        return forward(**kw)

    monkeypatch.setattr(engine.runner, "forward", faulty)
    with engine_held(engine):  # all four arrive together and prefill as one batch
        handles = [engine.submit(GenerationRequest(p, greedy())) for p in prompts]
    results = []
    for h in handles:
        try:
            results.append(h.result().token_ids)
        except RequestFailedError as exc:
            results.append(str(exc))
    assert results[0] == alone[0] and results[2] == alone[2] and results[3] == alone[3]
    assert "injected fault" in results[1]
