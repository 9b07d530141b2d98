"""Generation while an attribution runs, on the embedded default model, measured in one run.

A streaming greedy generation of --tokens tokens runs alone, then again while an integrated-gradients attribution
(64-token prompt, 16-token answer, per-token matrix, --n-steps) runs as a job on the same engine. Prints the
inter-token latencies of both runs, the longest job chunk, and the ratio (longest gap with the job) / (longest
chunk + median gap alone): at most about 1 when generation waits for at most one chunk at a time.

usage: python bench/attribution_interleave.py [--tokens 64] [--n-steps 64] [--chunk-tokens 2048]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steering.backends.hf import EngineConfig, HFEngine  # noqa: E402
from steering.backends.hf.loading import load_model  # noqa: E402
from steering.engine import GenerationRequest  # noqa: E402
from steering.sampling import SamplingParams  # noqa: E402
from steering.tasks.attribution import AttributionRequest, AttributionTarget, prepare  # noqa: E402


def gaps(engine: HFEngine, ids: list[int], tokens: int) -> list[float]:
    handle = engine.submit(GenerationRequest(ids, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)))
    times = [out.time for out in handle if out.token_ids]
    return [b - a for a, b in zip(times, times[1:])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--n-steps", type=int, default=64)
    ap.add_argument("--chunk-tokens", type=int, default=2048)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    lm = load_model(None, device="cpu", dtype="float32")
    tok = lm.tokenizer
    ids = tok("Write a short story about a lighthouse keeper.", add_special_tokens=False)["input_ids"]
    prompt = tok(" ".join(["The lighthouse stood on the rocks above the grey sea."] * 8),
                 add_special_tokens=False)["input_ids"][:64]
    answer = tok(" Every night the keeper climbed the stairs and lit the lamp for the ships.",
                 add_special_tokens=False)["input_ids"][:16]
    engine = HFEngine(lm, EngineConfig(job_chunk_tokens=args.chunk_tokens)).start()
    try:
        gaps(engine, ids, 8)  # warm-up
        alone = gaps(engine, ids, args.tokens)
        prep = prepare(lm, AttributionRequest(prompt, AttributionTarget.per_token(answer), "integrated_gradients",
                                              {"n_steps": args.n_steps}))
        chunk_times: list[float] = []
        job = engine.submit_job(prep.work, "attribution")
        watcher_stop = threading.Event()

        def watch() -> None:  # record each chunk's duration from the job's own accounting
            last_chunks, last_compute = 0, 0.0
            while not watcher_stop.is_set():
                m = job.metrics
                if m.chunks != last_chunks:
                    chunk_times.append((m.compute_seconds - last_compute) / (m.chunks - last_chunks))
                    last_chunks, last_compute = m.chunks, m.compute_seconds
                time.sleep(0.0005)

        th = threading.Thread(target=watch, daemon=True)
        th.start()
        while job.metrics.chunks < 1:
            time.sleep(0.001)
        during = gaps(engine, ids, args.tokens)
        running_at_end = not job.done()
        res = job.result()
        watcher_stop.set()
        th.join()
    finally:
        engine.shutdown()
    longest_chunk = max(chunk_times)
    print(f"generation alone: {len(alone) + 1} tokens, inter-token median {statistics.median(alone) * 1e3:.1f} ms, "
          f"max {max(alone) * 1e3:.1f} ms")
    print(f"with an attribution job running ({'still running' if running_at_end else 'finished'} when the "
          f"generation ended): median {statistics.median(during) * 1e3:.1f} ms, max {max(during) * 1e3:.1f} ms")
    print(f"attribution: {job.metrics.chunks} chunks, longest {longest_chunk * 1e3:.0f} ms, "
          f"{job.metrics.compute_seconds:.1f} s of compute, matrix {tuple(res.scores.shape)}")
    bound = longest_chunk + statistics.median(alone)
    print(f"ratio: longest gap with the job / (longest chunk + median gap alone) = {max(during) / bound:.2f}")


if __name__ == "__main__":
    main()
