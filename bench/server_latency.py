"""HTTP overhead and steered throughput over HTTP, on the embedded default model.

Prints, measured in one run:
  (1) streaming TTFT p50 over HTTP minus in-process TTFT p50 (same prompts, one request at a time);
      target <= 5 ms;
  (2) steered / unsteered generation throughput over HTTP with 16 concurrent streaming clients, each using
      its own registered vector on every layer (normalize on); target >= 0.95.
The server runs as a separate process (`python -m cli serve`), as in production.

usage: python bench/server_latency.py [--prompts 20] [--clients 16] [--tokens 64] [--repeats 2]
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
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steering.backends.hf import HFEngine  # noqa: E402
from steering.backends.hf.loading import load_model  # noqa: E402
from steering.engine import GenerationRequest  # noqa: E402
from steering.sampling import SamplingParams  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Why is the sky blue?", "What is 2+2?",
             "Tell me a joke.", "What is a cat?", "Who wrote Hamlet?", "What is rain?", "Define gravity.",
             "What is an apple?"]


def in_process_ttft(lm, prompts: list[str], runs: int) -> list[float]:
    out = []
    with HFEngine(lm).start() as engine:
        engine.generate(lm.inputs.encode_chat([{"role": "user", "content": "hi"}]), SamplingParams(max_tokens=2))
        for i in range(runs):
            ids = lm.inputs.encode_chat([{"role": "user", "content": prompts[i % len(prompts)]}])
            t0 = time.perf_counter()
            handle = engine.submit(GenerationRequest(ids, SamplingParams(max_tokens=8, temperature=0)))
            first = None
            for o in handle:  # read to the end, as the HTTP client does, so requests never overlap
                if o.text and first is None:
                    first = time.perf_counter() - t0
            out.append(first)
    return out


async def http_ttft(url: str, model: str, prompts: list[str], runs: int) -> list[float]:
    out = []
    async with httpx.AsyncClient(timeout=120) as c:
        for i in range(runs + 1):
            body = {"model": model, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                    "max_tokens": 8, "temperature": 0, "stream": True}
            t0, first = time.perf_counter(), None
            async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if first is None and line.startswith("data: {"):
                        ev = json.loads(line[6:])
                        if ev.get("choices") and ev["choices"][0]["delta"].get("content"):
                            first = time.perf_counter() - t0
            if i:  # the first request is a warm-up
                out.append(first)
    return out


async def load(url: str, model: str, clients: int, tokens: int, names: list[str] | None) -> float:
    async def one(c, i):
        body = {"model": model, "messages": [{"role": "user", "content": f"Write a story about {QUESTIONS[i % 10]}"}],
                "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        if names:
            body["steering"] = {"vectors": [{"name": names[i], "scale": 4, "normalize": True}]}
        n = 0
        async with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    ev = json.loads(line[6:])
                    if ev.get("usage"):
                        n = ev["usage"]["completion_tokens"]
        return n

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as c:
        t0 = time.perf_counter()
        total = sum(await asyncio.gather(*(one(c, i) for i in range(clients))))
        return total / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--port", type=int, default=8123)
    args = ap.parse_args()

    lm = load_model(None, device="cpu", dtype="float32")
    local = in_process_ttft(lm, QUESTIONS, args.prompts)
    hidden, layers = lm.hidden_size, lm.num_layers
    del lm

    vec_dir = tempfile.mkdtemp(prefix="steerserve-bench-")
    env = os.environ | {"STEERSERVE_VECTOR_DIR": vec_dir, "STEERSERVE_PORT": str(args.port),
                        "STEERSERVE_MAX_BATCH_SIZE": str(args.clients), "STEERSERVE_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve"], env=env, cwd=ROOT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        remote = asyncio.run(http_ttft(url, model, QUESTIONS, args.prompts))
        lp, rp = statistics.median(local) * 1000, statistics.median(remote) * 1000
        print(f"(1) TTFT p50: HTTP streaming {rp:.1f} ms, in-process {lp:.1f} ms, difference {rp - lp:.1f} ms "
              f"({args.prompts} prompts, one at a time; target <= 5 ms)")

        g = torch.Generator().manual_seed(0)
        names = []
        for i in range(args.clients):
            vals = {str(l): torch.nn.functional.normalize(torch.randn(hidden, generator=g), dim=0).tolist()
                    for l in range(layers)}
            r = httpx.post(url + "/v1/steering/vectors", json={"name": f"bench{i}", "values": vals}, timeout=60)
            r.raise_for_status()
            names.append(f"bench{i}")
        asyncio.run(load(url, model, 4, 8, None))  # warm-up
        plain, steered = [], []
        for _ in range(args.repeats):
            plain.append(asyncio.run(load(url, model, args.clients, args.tokens, None)))
            steered.append(asyncio.run(load(url, model, args.clients, args.tokens, names)))
        p, s = statistics.median(plain), statistics.median(steered)
        pair = statistics.median(st / pl for pl, st in zip(plain, steered))  # back-to-back pairs cancel drift
        print(f"(2) HTTP throughput, {args.clients} clients x {args.tokens} tokens: unsteered {p:.1f} tok/s, "
              f"steered {s:.1f} tok/s (own vector each, 30 layers, normalize); ratio {pair:.3f} (median of "
              f"{args.repeats} back-to-back pairs; ratio of medians {s / p:.3f}; target >= 0.95)")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


if __name__ == "__main__":
    main()
