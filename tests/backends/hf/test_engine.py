"""Engine correctness on a tiny random Llama: batching invariance, steering semantics, lifecycle."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from steering.backends.hf import HFEngine
from steering.engine import GenerationRequest
from steering.errors import InvalidRequestError, QueueFullError, RequestFailedError, SteeringValidationError
from steering.sampling import SamplingParams
from steering.spec import SteeringApplication, SteeringSpec
from steering.vectors import SteeringVector

PROMPTS = [
    "The quick brown fox",
    "What is the capital of France?",
    "Numbers: 0 1 2 3",
    "I love this movie, it is",
    "Hello world! How are you today? I am fine, thank you.",
    "Q: Can you see the Great Wall",
]


def greedy(n: int = 24, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def rand_vector(lm, seed: int, layers=None, name=None) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    layers = range(lm.num_layers) if layers is None else layers
    return SteeringVector({l: torch.randn(lm.hidden_size, generator=g) for l in layers}, name=name)


def ids(lm, text: str) -> list[int]:
    return lm.inputs.encode_text(text)


def run_alone(engine: HFEngine, prompt_ids, sampling, steering=None):
    return engine.generate(prompt_ids, sampling, steering).token_ids


def run_together(engine: HFEngine, reqs):
    handles = [engine.submit(GenerationRequest(p, s, st)) for p, s, st in reqs]
    return [h.result().token_ids for h in handles]


def test_matches_hf_generate(tiny_lm, make_engine):
    engine = make_engine()
    for text in PROMPTS[:3]:
        p = ids(tiny_lm, text)
        ref = tiny_lm.model.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False,
                                     min_new_tokens=20, pad_token_id=tiny_lm.tokenizer.pad_token_id)
        assert run_alone(engine, p, greedy(20)) == ref[0, len(p):].tolist()


def test_mixed_batch_equals_alone(tiny_lm, make_engine):
    engine = make_engine(max_batch_size=8)
    reqs = []
    for i, text in enumerate(PROMPTS):
        steer = None
        if i % 2 == 0:
            steer = SteeringSpec.single(rand_vector(tiny_lm, i), scale=2.0 + i, normalize=i % 4 == 0,
                                        positions=["all", "generated", "prompt"][i % 3])
        reqs.append((ids(tiny_lm, text), greedy(16 + i), steer))
    alone = [run_alone(engine, *r) for r in reqs]
    together = run_together(engine, reqs)
    assert together == alone
    # steering actually changed something
    assert any(alone[i] != run_alone(engine, reqs[i][0], reqs[i][1]) for i in range(0, len(reqs), 2))


def test_unsteered_identical_with_or_without_steered_neighbours(tiny_lm, make_engine):
    engine = make_engine()
    plain = [(ids(tiny_lm, t), greedy(20), None) for t in PROMPTS[:3]]
    steered = [(ids(tiny_lm, t), greedy(20), SteeringSpec.single(rand_vector(tiny_lm, 10 + i), scale=8.0,
                                                                    normalize=True)) for i, t in enumerate(PROMPTS)]
    only_plain = run_together(engine, plain)
    mixed = run_together(engine, plain + steered)
    assert mixed[: len(plain)] == only_plain


def test_scale_zero_equals_unsteered(tiny_lm, make_engine):
    engine = make_engine()
    p = ids(tiny_lm, PROMPTS[1])
    zero = SteeringSpec.single(rand_vector(tiny_lm, 3), scale=0.0, normalize=True)
    assert run_alone(engine, p, greedy(), zero) == run_alone(engine, p, greedy())


@pytest.mark.parametrize("positions", ["all", "prompt", "generated", [1, 3, 12, 15, 20]])
def test_positions_same_with_and_without_kv_cache(tiny_lm, make_engine, positions):
    cached = make_engine(use_kv_cache=True)
    uncached = make_engine(use_kv_cache=False)
    reqs = [(ids(tiny_lm, t), greedy(12), SteeringSpec.single(rand_vector(tiny_lm, 7), scale=6.0,
                                                              positions=positions, normalize=True))
            for t in PROMPTS[:3]]
    a = run_together(cached, reqs)
    b = run_together(uncached, reqs)
    assert a == b
    assert a != run_together(cached, [(p, s, None) for p, s, _ in reqs])


def test_explicit_positions_only_touch_those_positions(tiny_lm, make_engine):
    engine = make_engine()
    p = ids(tiny_lm, PROMPTS[0])
    n = len(p)
    # positions past the end of the generation never apply
    far = SteeringSpec.single(rand_vector(tiny_lm, 1), scale=50.0, positions=[n + 100])
    assert run_alone(engine, p, greedy(10), far) == run_alone(engine, p, greedy(10))
    # a position inside the generation changes only tokens predicted at or after it
    at = n + 5
    mid = SteeringSpec.single(rand_vector(tiny_lm, 1), scale=50.0, positions=[at])
    steered, plain = run_alone(engine, p, greedy(10), mid), run_alone(engine, p, greedy(10))
    # the token at position `at` is input at step at - n + 1; outputs before that are identical
    assert steered[: at - n] == plain[: at - n]
    assert steered != plain


def test_normalize_preserves_token_norm(tiny_lm):
    """The hook's rule on a real layer output: h' = (h + s v) ||h|| / ||h + s v||, per token."""
    from steering.backends.hf.hooks import SteeringBatch, SteeringHooks, to_device
    from steering.spec import resolve

    lm = tiny_lm
    vec = rand_vector(lm, 5, layers=[1])
    spec = SteeringSpec.single(vec, scale=3.0, normalize=True)
    captured = {}
    before = [len(layer._forward_hooks) for layer in lm.layers]  # transformers may keep its own capture hooks
    hooks = SteeringHooks(lm.layers)
    tap = lm.layers[1].register_forward_hook(lambda m, a, o: captured.__setitem__("out", o.clone()))
    pre = lm.layers[1].register_forward_hook(lambda m, a, o: captured.__setitem__("pre", o.clone()), prepend=True)
    try:
        x = torch.tensor([ids(lm, PROMPTS[3])])
        apps = to_device(resolve(spec, hidden_size=lm.hidden_size, num_layers=lm.num_layers).applications,
                         lm.device, lm.dtype)
        batch = SteeringBatch([apps], lm.hidden_size, lm.device, lm.dtype)
        T = x.shape[1]
        step = batch.gates(torch.arange(T).unsqueeze(0), torch.tensor([T]))
        with torch.no_grad(), hooks.active(step):
            lm.model(x)
    finally:
        hooks.remove()
        tap.remove()
        pre.remove()
    h, out = captured["pre"], captured["out"]
    expected = (h + 3.0 * vec.values[1]) * h.norm(dim=-1, keepdim=True) / (h + 3.0 * vec.values[1]).norm(
        dim=-1, keepdim=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.norm(dim=-1), h.norm(dim=-1), rtol=1e-5, atol=1e-5)
    assert [len(layer._forward_hooks) for layer in lm.layers] == before


def test_vectors_add_up(tiny_lm, make_engine):
    """Two raw vectors at scale 1 equal their sum at scale 1."""
    engine = make_engine()
    p = ids(tiny_lm, PROMPTS[2])
    a, b = rand_vector(tiny_lm, 1), rand_vector(tiny_lm, 2)
    summed = SteeringVector({l: a.values[l] + b.values[l] for l in a.values})
    two = SteeringSpec([SteeringApplication(a, scale=3.0), SteeringApplication(b, scale=3.0)])
    one = SteeringSpec.single(summed, scale=3.0)
    assert run_alone(engine, p, greedy(), two) == run_alone(engine, p, greedy(), one)


def test_late_request_joins_running_batch(tiny_lm, make_engine):
    engine = make_engine()
    first = engine.submit(GenerationRequest(ids(tiny_lm, PROMPTS[0]), greedy(150)))
    it = iter(first)
    for _ in range(5):  # the first request is decoding
        next(it)
    late = engine.submit(GenerationRequest(ids(tiny_lm, PROMPTS[1]), greedy(3)))
    late_result = late.result()
    assert len(late_result.token_ids) == 3
    remaining = list(it)
    assert remaining and remaining[-1].finish_reason == "length"
    assert sum(len(o.token_ids) for o in remaining) > 100  # the late one finished long before the first


def test_cancel_frees_slot(tiny_lm, make_engine):
    engine = make_engine(max_batch_size=1)
    long = engine.submit(GenerationRequest(ids(tiny_lm, PROMPTS[0]), greedy(400)))
    it = iter(long)
    next(it)
    waiting = engine.submit(GenerationRequest(ids(tiny_lm, PROMPTS[1]), greedy(4)))
    time.sleep(0.05)
    assert engine.stats().running == 1 and engine.stats().waiting == 1
    long.cancel()
    outs = list(it)
    assert outs[-1].finish_reason == "abort"
    assert len(waiting.result().token_ids) == 4
    deadline = time.time() + 5
    while engine.stats().running and time.time() < deadline:
        time.sleep(0.01)
    assert engine.stats().running == 0 and engine.stats().waiting == 0


def test_engine_serves_after_failing_request(tiny_lm, make_engine):
    engine = make_engine()

    def explode(generated, logits):
        if len(generated) == 3:
            raise RuntimeError("boom")
        return logits

    good_before = run_alone(engine, ids(tiny_lm, PROMPTS[1]), greedy(12))
    bad = engine.submit(GenerationRequest(ids(tiny_lm, PROMPTS[0]), greedy(12, logits_processors=[explode])))
    good = engine.submit(GenerationRequest(ids(tiny_lm, PROMPTS[1]), greedy(12)))
    with pytest.raises(RequestFailedError, match="boom"):
        bad.result()
    assert good.result().token_ids == good_before
    assert engine.alive()
    assert run_alone(engine, ids(tiny_lm, PROMPTS[1]), greedy(12)) == good_before
    steering_hooks = [sum("SteeringHooks" in getattr(h, "__qualname__", "") for h in layer._forward_hooks.values())
                      for layer in tiny_lm.layers]
    assert steering_hooks == [1] * tiny_lm.num_layers  # installed once, never per request


def test_steering_validation(tiny_lm, make_engine):
    engine = make_engine()
    p = ids(tiny_lm, PROMPTS[0])
    wrong_size = SteeringVector({0: torch.ones(tiny_lm.hidden_size + 1)})
    with pytest.raises(SteeringValidationError, match="hidden size"):
        engine.submit(GenerationRequest(p, greedy(), SteeringSpec.single(wrong_size)))
    with pytest.raises(SteeringValidationError, match="does not exist"):
        engine.submit(GenerationRequest(p, greedy(), SteeringSpec.single(
            SteeringVector({99: torch.ones(tiny_lm.hidden_size)}))))
    with pytest.raises(SteeringValidationError, match="no values for layer 2"):
        engine.submit(GenerationRequest(p, greedy(), SteeringSpec.single(rand_vector(tiny_lm, 0, [0]), layers=[2])))
    nan = torch.ones(tiny_lm.hidden_size)
    nan[3] = float("nan")
    with pytest.raises(SteeringValidationError, match="NaN"):
        engine.submit(GenerationRequest(p, greedy(), SteeringSpec.single(SteeringVector({0: nan}))))
    with pytest.raises(SteeringValidationError, match="scale"):
        engine.submit(GenerationRequest(p, greedy(), SteeringSpec.single(rand_vector(tiny_lm, 0), scale=float("inf"))))
    with pytest.raises(SteeringValidationError, match="positions"):
        engine.submit(GenerationRequest(p, greedy(), SteeringSpec.single(rand_vector(tiny_lm, 0), positions="late")))
    with pytest.raises(InvalidRequestError, match="maximum context length"):
        engine.submit(GenerationRequest(p, greedy(10_000)))
    with pytest.raises(InvalidRequestError, match="top_p"):
        engine.submit(GenerationRequest(p, SamplingParams(top_p=0)))
    assert engine.stats().waiting == 0 and engine.stats().running == 0


def test_queue_full(tiny_lm, make_engine):
    engine = make_engine(max_batch_size=1, max_queue_size=2)
    p = ids(tiny_lm, PROMPTS[0])
    handles = []
    with pytest.raises(QueueFullError):
        for _ in range(10):
            handles.append(engine.submit(GenerationRequest(p, greedy(300))))
    assert 2 <= len(handles) <= 3  # one may already be running
    for h in handles:
        h.cancel()
    for h in handles:
        assert list(h)[-1].finish_reason in ("abort", "length")


def test_seeded_sampling_reproducible_in_any_batch(tiny_lm, make_engine):
    engine = make_engine()
    p = ids(tiny_lm, PROMPTS[4])
    def sp() -> SamplingParams:
        return SamplingParams(max_tokens=20, temperature=1.3, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)

    alone = run_alone(engine, p, sp())
    others = [(ids(tiny_lm, t), SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True), None)
              for t in PROMPTS]
    together = run_together(engine, others + [(p, sp(), None)])
    assert together[-1] == alone
    other_seed = SamplingParams(max_tokens=20, temperature=1.3, top_p=0.9, top_k=50, seed=99, ignore_eos=True)
    assert run_alone(engine, p, other_seed) != alone


def test_stop_conditions_and_logprobs(tiny_lm, make_engine):
    engine = make_engine()
    p = ids(tiny_lm, PROMPTS[0])
    full = engine.generate(p, greedy(30))
    # stop token id: the 5th generated token
    tok5 = full.token_ids[4]
    first = full.token_ids.index(tok5)
    r = engine.generate(p, greedy(30, stop_token_ids=[tok5]))
    assert r.finish_reason == "stop" and r.stop_reason == tok5 and len(r.token_ids) == first + 1
    # stop string taken from the middle of the text
    stop = full.text[8:11]
    r = engine.generate(p, greedy(30, stop=[stop]))
    assert r.finish_reason == "stop" and r.stop_reason == stop
    assert r.text == full.text[: full.text.index(stop)]
    r = engine.generate(p, greedy(30, stop=[stop], include_stop_str_in_output=True))
    assert r.text == full.text[: full.text.index(stop) + len(stop)]
    # logprobs are those of the raw distribution; greedy picks the top one
    r = engine.generate(p, greedy(5, logprobs=True, top_logprobs=3))
    assert len(r.logprobs) == 5
    for lp, tok in zip(r.logprobs, r.token_ids):
        assert lp.token_id == tok and lp.top[0][0] == tok
        assert lp.logprob == pytest.approx(lp.top[0][1])
        assert len(lp.top) == 3 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


def test_min_tokens_and_eos(tiny_lm, make_engine):
    engine = make_engine()
    eos = tiny_lm.tokenizer.eos_token_id
    p = ids(tiny_lm, PROMPTS[5])

    def force_eos(generated, logits):
        out = torch.full_like(logits, -1e9)
        out[eos] = 0
        out[5] = -1.0
        return out

    r = engine.generate(p, SamplingParams(max_tokens=10, temperature=0, logits_processors=[force_eos]))
    assert r.token_ids == [eos] and r.finish_reason == "stop"
    r = engine.generate(p, SamplingParams(max_tokens=10, min_tokens=4, temperature=0,
                                          logits_processors=[force_eos]))
    assert r.token_ids == [5, 5, 5, 5, eos] and r.finish_reason == "stop"
    r = engine.generate(p, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                          logits_processors=[force_eos]))
    assert len(r.token_ids) == 6 and r.finish_reason == "length"


def test_streaming_text_equals_final_text_and_async(tiny_lm, make_engine):
    engine = make_engine()
    p = tiny_lm.inputs.encode_chat([{"role": "user", "content": "Hello café 東京"}])

    async def main():
        loop = asyncio.get_running_loop()
        handle = engine.submit(GenerationRequest(p, greedy(40)), loop=loop)
        parts = [o async for o in handle]
        return parts

    parts = asyncio.run(main())
    assert parts[-1].finished and parts[-1].finish_reason == "length"
    text = "".join(o.text for o in parts)
    toks = [t for o in parts for t in o.token_ids]
    assert text == tiny_lm.tokenizer.decode(toks, skip_special_tokens=True)


def test_concurrent_submitters_from_threads(tiny_lm, make_engine):
    engine = make_engine(max_batch_size=4)
    p = ids(tiny_lm, PROMPTS[2])
    expected = run_alone(engine, p, greedy(10))
    results, errors = [], []

    def worker():
        try:
            results.append(engine.generate(p, greedy(10)).token_ids)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == [expected] * 12


def test_long_generation_grows_kv_cache(tiny_lm, make_engine):
    cached = make_engine(kv_initial_capacity=8)
    uncached = make_engine(use_kv_cache=False)
    reqs = [(ids(tiny_lm, t), greedy(40), None) for t in PROMPTS[:4]]
    assert run_together(cached, reqs) == run_together(uncached, reqs)
    assert cached.runner.cache.capacity >= 40
