"""Tiny load probe for an OpenAI-compatible server (used for the vLLM CPU baseline).

N concurrent streaming /v1/completions, greedy, ignore_eos, max_tokens fixed.
Reports completion tok/s (total completion tokens / wall time) and TTFT.

usage: python bench/_vllm_probe.py [--url http://127.0.0.1:8000] [-n 16] [--max-tokens 128]
"""
import argparse
import asyncio
import json
import statistics
import time

import httpx


async def one(client, url, model, prompt, max_tokens):
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]
            if ev.get("choices") and ev["choices"][0].get("text"):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                chunks += 1
    toks = usage["completion_tokens"] if usage else chunks
    return ttft, toks, time.perf_counter() - t0


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="default")
    ap.add_argument("-n", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds")
    a = ap.parse_args()
    prompts = [f"Write a short story about a robot number {i}." for i in range(a.n)]
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=a.n + 4)) as c:
        for _ in range(a.warmup):
            await asyncio.gather(*(one(c, a.url, a.model, p, 8) for p in prompts))
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(c, a.url, a.model, p, a.max_tokens) for p in prompts))
        wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in res if r[0] is not None)
    total = sum(r[1] for r in res)
    print(json.dumps({
        "requests": a.n, "max_tokens": a.max_tokens, "completion_tokens": total,
        "wall_s": round(wall, 3), "tok_per_s": round(total / wall, 1),
        "ttft_mean_s": round(statistics.mean(ttfts), 3),
        "ttft_p50_s": round(ttfts[len(ttfts) // 2], 3), "ttft_max_s": round(ttfts[-1], 3),
    }))


if __name__ == "__main__":
    asyncio.run(main())
