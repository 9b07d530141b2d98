"""The vLLM steering op's cost with and without telemetry, on the state built directly (no vLLM): 16 decode tokens
(16 requests, each its own normalising vector on every layer, at all positions) x 30 layers x 576 hidden (the
default model's shape), one thread, the plan reused across decode steps as in a real decode run.

Prints the op's time per step (30 layer calls after one fill) for: telemetry off (``telemetry_every=0``), every
step measured (``1``: the cost of a measured step) and the default (``8``), each the median of interleaved rounds,
and the ratios to "off". Run it on the commit before the telemetry too (it then measures "off" only)::

    python bench/op_telemetry.py [--rounds 7] [--steps 400] [--raw] [--every 0,1,8]
    # --raw: half the vectors not normalising; --every 0 alone: the same work as the commit before
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steering.backends.vllm import wire  # noqa: E402
from steering.backends.vllm.op import steer_impl  # noqa: E402
from steering.backends.vllm.state import SteerState, set_state  # noqa: E402

N, L, H = 16, 30, 576


def build(every: int | None, raw: bool) -> tuple[SteerState, SimpleNamespace]:
    kw = {} if every is None else {"telemetry_every": every}
    st = SteerState(max_num_tokens=256, max_num_seqs=N, hidden_size=H, num_layers=L, max_model_len=4096,
                    device=torch.device("cpu"), max_applications=4, bank_rows=N * L + 8, dense=False, **kw)
    requests = {}
    for r in range(N):
        g = torch.Generator().manual_seed(r)
        values = {layer: torch.randn(H, generator=g) for layer in range(L)}
        key = wire.vector_key(f"v{r}", values)
        assert st.register(key, wire.layer_bytes(values))["status"] == "ok"
        app = SimpleNamespace(layers=list(range(L)), scale=4.0, positions="all", normalize=not (raw and r % 2))
        requests[f"r{r}"] = SimpleNamespace(num_prompt_tokens=32, sampling_params=SimpleNamespace(
            extra_args={wire.KEY: wire.encode([(key, app)])}))
    runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=list(requests), num_reqs=N), requests=requests)
    return st, runner


def run(st: SteerState, runner: SimpleNamespace, steps: int) -> float:
    """Seconds per decode step: one fill and the op on every layer."""
    g = torch.Generator().manual_seed(0)
    streams = [(torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)) for _ in range(L)]
    work = [(h.clone(), r.clone()) for h, r in streams]
    counts = np.ones(N, dtype=np.int64)
    set_state(st)
    try:
        total = 0.0
        for step in range(steps):
            positions = torch.full((N,), 40 + step)
            for (h, r), (h0, r0) in zip(work, streams):  # fresh inputs, outside the timing
                h.copy_(h0)
                r.copy_(r0)
            t0 = time.perf_counter()
            st.fill(runner, counts)
            for layer, (h, r) in enumerate(work):
                steer_impl(h, r, positions, layer)
            total += time.perf_counter() - t0
        return total / steps
    finally:
        set_state(None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--raw", action="store_true", help="half the requests steer without normalize")
    ap.add_argument("--every", default="0,1,8", help="the telemetry_every values to run (0: off)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    has_telemetry = "telemetry_every" in inspect.signature(SteerState.__init__).parameters
    names = {0: "off", 1: "every step", 8: "every 8th (default)"}
    configs = ({names.get(n, f"every {n}th"): n for n in map(int, args.every.split(","))} if has_telemetry
               else {"(no telemetry)": None})
    states = {name: build(every, args.raw) for name, every in configs.items()}
    for st, runner in states.values():
        run(st, runner, 50)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, (st, runner) in states.items():
            times[name].append(run(st, runner, args.steps))
    base = statistics.median(next(iter(times.values())))
    print(f"{N} decode tokens x {L} layers x {H}, 1 thread, {'mixed' if args.raw else 'normalising'} vectors, "
          f"{args.rounds} rounds x {args.steps} steps")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:22s} {med * 1e3:7.3f} ms/step  (x{med / base:.3f})  rounds {min(ts) * 1e3:.3f}-"
              f"{max(ts) * 1e3:.3f}")


if __name__ == "__main__":
    main()
