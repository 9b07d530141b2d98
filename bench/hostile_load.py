"""Load with a hostile client mixed in: 64 concurrent streaming clients on the embedded default model, steered
with their own registered vectors half the time, and one hostile request every second (overflowing steering,
positions out of range, lone surrogates, oversized and slow bodies, slow headers, malformed JSON, absurd limits,
bad vector files, padding templates, mid-stream disconnects...).

Runs two windows of the same length, calm and then hostile, and prints, measured in one run: good requests by outcome
and latency in each, hostile requests by kind and status, whether any good request failed (the target: none) or any
answer was a 5xx other than 503, and the ratio of good throughput with hostile traffic to calm. The server runs as
its own process (``python -m cli serve``), as in production.

usage: python bench/hostile_load.py [--clients 64] [--seconds 90] [--tokens 24] [--port 8031]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MSGS = [{"role": "user", "content": "Tell me a short story about a lighthouse."}]


def hostile_requests(model: str, hidden: int, layers: int):
    """(kind, coroutine factory) pairs; each factory takes the client and returns a status code (or a word)."""
    chat = {"model": model, "messages": MSGS, "max_tokens": 16, "temperature": 0}
    big = [3e38] * hidden

    async def post(c, path, body=None, content=None, headers=None):
        r = await c.post(path, json=body, content=content, headers=headers)
        return r.status_code

    async def slow_headers(c):
        """A header byte a second; the server should close the connection after its header timeout."""
        reader, writer = await asyncio.open_connection(c.base_url.host, c.base_url.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\n")
        started = time.monotonic()
        try:
            for _ in range(60):
                writer.write(b"X")
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(200), 1.0) == b"":
                        break  # closed by the server
                except TimeoutError:
                    continue
        except ConnectionError:
            pass
        finally:
            writer.close()
        return f"closed after {round(time.monotonic() - started)} s"

    async def slow_body(c):
        host, port = c.base_url.host, c.base_url.port
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(200), 120)
        writer.close()
        return int(reply.split()[1]) if reply.startswith(b"HTTP/1.1") else "closed"

    async def disconnect_mid_stream(c):
        async with c.stream("POST", "/v1/chat/completions", json={**chat, "max_tokens": 200, "stream": True}) as r:
            async for _ in r.aiter_lines():
                break
        return "disconnected"

    async def chunked_too_large(c):
        async def body():
            for _ in range(70):
                yield b"x" * (256 * 1024)
        return await post(c, "/v1/chat/completions", content=body(), headers={"content-type": "application/json"})

    def steer(**ref):
        return {**chat, "steering": {"vectors": [ref]}}

    return [
        ("overflowing scale", lambda c: post(c, "/v1/chat/completions", steer(values={"3": [1.0] * hidden},
                                                                              scale=1e38))),
        ("overflow at run time", lambda c: post(c, "/v1/chat/completions", {
            **chat, "steering": {"vectors": [{"values": {"3": big}}, {"values": {"3": big}}]}})),
        ("positions beyond int64", lambda c: post(c, "/v1/chat/completions", steer(values={"3": [0.1] * hidden},
                                                                                   positions=[2**70]))),
        ("lone surrogate", lambda c: post(c, "/v1/chat/completions", content=json.dumps(
            {**chat, "messages": [{"role": "user", "content": "a\ud800b"}]}).encode(),
            headers={"content-type": "application/json"})),
        ("100k stop strings", lambda c: post(c, "/v1/chat/completions", {**chat, "stop": ["s"] * 100_000})),
        ("n beyond the queue", lambda c: post(c, "/v1/completions", {"model": model, "prompt": "hi", "n": 16,
                                                                     "max_tokens": 2})),
        ("17 MB body", lambda c: post(c, "/v1/chat/completions", content=b"x" * (17 * 1024 * 1024),
                                      headers={"content-type": "application/json"})),
        ("chunked 17 MB body", chunked_too_large),
        ("slow headers", slow_headers),
        ("slow body", slow_body),
        ("malformed JSON", lambda c: post(c, "/v1/chat/completions", content=b'{"model": ',
                                          headers={"content-type": "application/json"})),
        ("unknown field", lambda c: post(c, "/v1/chat/completions", {**chat, "steerin": {}})),
        ("NaN in a vector", lambda c: post(c, "/v1/chat/completions", content=json.dumps(
            steer(values={"3": [float("nan")] * hidden})).encode(), headers={"content-type": "application/json"})),
        ("name with a newline", lambda c: post(c, "/v1/steering/vectors",
                                               {"name": "v\n", "values": {"3": [0.0] * hidden}})),
        ("bad vector file", lambda c: _status(c.post(
            "/v1/steering/vectors", data={"name": "bad"},
            files={"file": ("v.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"__metadata__\":[]}")}))),
        ("padding template", lambda c: post(c, "/v1/evaluations", {
            "type": "truthfulqa", "template": "{question:>99999999}",
            "questions": [{"question": "q", "best_answer": "a", "incorrect_answers": ["b"]}]})),
        ("layer out of range", lambda c: post(c, "/v1/chat/completions", steer(values={str(layers): [0.1] * hidden}))),
        ("disconnect mid-stream", disconnect_mid_stream),
    ]


async def _status(coro):
    return (await coro).status_code


async def good_client(i: int, c: httpx.AsyncClient, model: str, tokens: int, end: float, stats: dict,
                      latencies: list[float]) -> None:
    n = 0
    while time.monotonic() < end:
        body = {"model": model, "messages": MSGS, "max_tokens": tokens, "temperature": 0, "stream": True,
                "ignore_eos": True}
        if (i + n) % 2:
            body["steering"] = {"vectors": [{"name": f"v{i % 4}", "scale": 2.0, "normalize": True}]}
        n += 1
        t0 = time.monotonic()
        try:
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    stats[f"http {r.status_code}"] += 1
                    continue
                lines = [line async for line in r.aiter_lines() if line]
            if lines[-1] != "data: [DONE]" or any('"error"' in line for line in lines):
                stats["error in stream"] += 1
            else:
                stats["ok"] += 1
                latencies.append(time.monotonic() - t0)
        except httpx.HTTPError as exc:
            stats[f"transport {type(exc).__name__}"] += 1


async def run(args, url: str) -> None:
    limits = httpx.Limits(max_connections=args.clients + 16, max_keepalive_connections=args.clients + 16)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as c:
        model = (await c.get("/v1/models")).json()["data"][0]
        hidden, layers = model["hidden_size"], model["num_layers"]
        rng = random.Random(0)
        for v in range(4):
            vals = {str(layer): [rng.gauss(0, 1) / hidden ** 0.5 for _ in range(hidden)] for layer in range(layers)}
            r = await c.post("/v1/steering/vectors", json={"name": f"v{v}", "values": vals, "overwrite": True})
            assert r.status_code == 201, r.text
        kinds = hostile_requests(model["id"], hidden, layers)
        calm = await window(args, c, model["id"], None)
        rough = await window(args, c, model["id"], kinds)
    for title, (good, latencies, _, wall) in (("calm", calm), ("with a hostile request every second", rough)):
        print(f"{title}: {sum(good.values())} good requests in {wall:.0f} s from {args.clients} concurrent streaming "
              f"clients ({args.tokens} tokens each, half steered): "
              + ", ".join(f"{o} x{n}" for o, n in sorted(good.items())))
        if latencies:
            q = lambda f, xs=latencies: xs[min(len(xs) - 1, int(f * len(xs)))]  # noqa: E731
            print(f"  latency p50 {q(0.5):.1f} s, p95 {q(0.95):.1f} s, max {latencies[-1]:.1f} s; "
                  f"{len(latencies) * args.tokens / args.seconds:.1f} good tokens/s")
    hostile = rough[2]
    print(f"hostile requests: {sum(sum(v.values()) for v in hostile.values())}")
    server_errors = 0
    for kind, outcomes in hostile.items():
        print(f"  {kind}: " + ", ".join(f"{o} x{n}" for o, n in sorted(outcomes.items())))
        server_errors += sum(n for o, n in outcomes.items() if o.isdigit() and o.startswith("5") and o != "503")
    failed = sum(sum(g.values()) - g["ok"] for g, *_ in (calm, rough))
    ratio = len(rough[1]) / max(1, len(calm[1]))
    print(f"good requests that failed: {failed}; 5xx (other than 503) answered to hostile requests: {server_errors}; "
          f"good throughput with hostile traffic / calm: {ratio:.2f}")


async def window(args, c: httpx.AsyncClient, model: str, kinds):
    """One measurement window: the good clients, and the hostile requests when ``kinds`` is given."""
    good: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    hostile: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    end = time.monotonic() + args.seconds

    async def hostile_loop() -> None:
        tasks = []
        k = 0
        while kinds and time.monotonic() < end:
            kind, make = kinds[k % len(kinds)]
            k += 1

            async def one(kind=kind, make=make) -> None:
                try:
                    hostile[kind][str(await make(c))] += 1
                except Exception as exc:  # noqa: BLE001 - what the hostile client saw
                    hostile[kind][type(exc).__name__] += 1

            tasks.append(asyncio.create_task(one()))
            await asyncio.sleep(1.0)
        await asyncio.gather(*tasks)

    t0 = time.monotonic()
    await asyncio.gather(hostile_loop(), *(good_client(i, c, model, args.tokens, end, good, latencies)
                                           for i in range(args.clients)))
    latencies.sort()
    return good, latencies, hostile, time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--port", type=int, default=8031)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as vectors:
        env = os.environ | {"STEERSERVE_VECTOR_DIR": vectors, "STEERSERVE_PORT": str(args.port),
                            "STEERSERVE_MAX_BATCH_SIZE": "16", "STEERSERVE_LOG_LEVEL": "warning",
                            "STEERSERVE_HEADER_TIMEOUT_SECONDS": "5", "STEERSERVE_BODY_TIMEOUT_SECONDS": "5"}
        proc = subprocess.Popen([sys.executable, "-m", "cli", "serve"], env=env, cwd=ROOT)
        url = f"http://127.0.0.1:{args.port}"
        try:
            deadline = time.time() + 300
            while time.time() < deadline:
                try:
                    if httpx.get(url + "/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            asyncio.run(run(args, url))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


if __name__ == "__main__":
    main()
