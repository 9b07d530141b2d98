"""Preemption: with a KV cache of six blocks, running requests are preempted (their KV freed) and recomputed
from position 0 later; steered requests must come out exactly as the HF backend's, every position kind."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from steering.engine.types import GenerationRequest
from steering.sampling import SamplingParams
from steering.spec import SteeringApplication, SteeringSpec
from steering.vectors import SteeringVector
from tests.backends.vllm.conftest import ENGINE, env

pytestmark = pytest.mark.vllm

BLOCK, BLOCKS, TOKENS = 32, 6, 12


def vector(seed: int, hidden: int, layers: int) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({i: torch.randn(hidden, generator=g) for i in range(layers)})


def test_preempted_steered_requests_are_recomputed_with_the_same_steering(vllm_model, vllm_cache, hf_ref):
    from steering.backends.vllm.engine import VLLMBackend, VLLMConfig

    cfg = AutoConfig.from_pretrained(vllm_model)
    head = cfg.hidden_size // cfg.num_attention_heads
    per_block = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head * 4 * BLOCK  # K and V, fp32
    hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    # 30-token prompts cross a block boundary while decoding; eight of them cannot all hold their blocks
    prompts = [[4 + (i * 37 + j * 11) % 390 for j in range(30)] for i in range(8)]
    kinds = [
        SteeringSpec([SteeringApplication(vector(1, hidden, layers), 6.0, positions=[29, 31, 33, 35],
                                          normalize=True)]),
        SteeringSpec([SteeringApplication(vector(2, hidden, layers), 3.0, positions="generated")]),
        SteeringSpec([SteeringApplication(vector(3, hidden, layers), 3.0, positions="prompt")]),
        None,
    ]
    specs = [kinds[i % 4] for i in range(8)]
    sp = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
    want = [hf_ref.generate(p, sp, s).token_ids for p, s in zip(prompts, specs, strict=True)]

    engine = {**ENGINE, "kv_cache_gib": None, "max_num_batched_tokens": 64, "max_model_len": 128}
    with env(VLLM_CACHE_ROOT=str(vllm_cache / "preempt"), VLLM_CPU_KVCACHE_SPACE=None):
        backend = VLLMBackend(VLLMConfig(model=str(vllm_model), enforce_eager=True, **engine,
                                         engine_args={"kv_cache_memory_bytes": BLOCKS * per_block})).start()
    try:
        with backend.batched():
            handles = [backend.submit(GenerationRequest(p, sp, s)) for p, s in zip(prompts, specs, strict=True)]
        got = [h.result().token_ids for h in handles]
        preempted = backend.preemptions
        assert backend.drain(10)
        slots = backend.worker_stats_sync()[0]["slots_in_use"]
    finally:
        backend.shutdown()
    assert preempted > 0, "the test did not preempt anything: shrink the KV cache"
    assert got == want
    assert slots == 0
