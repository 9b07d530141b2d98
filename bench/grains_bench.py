"""GrAInS build benchmark on the embedded default model (SmolLM2-135M-Instruct), measured in one run.

Builds a GrAInS vector (every layer, k=10, mode both, PCA) from 50 triples of ``../shared/data/truthfulqa_dev.csv``
(rows 0-49, inside the vector-building split rows 0-199; prompt 'Q: {question}\\nA:', preferred = best answer,
dispreferred = first incorrect answer) with 20 integrated-gradients steps, and prints:
  (1) wall time and peak memory (the process's RSS, sampled every 20 ms) of the whole build;
  (2) the overhead ratio: build wall time / wall time of the same integrated-gradients forward and backward
      passes run alone (target <= 1.15);
  (3) the ratio of the same build written naively (``bench/grains_naive.py``: Captum IG per example, one
      sequence at a time, full-vocabulary logits) to ours (target >= 2), and how far the two agree: the
      cosine of the vectors per layer and the share of identical token selections.
Timings follow a warm-up at full chunk size; (2) runs IG alone, build, build, IG alone and compares the
means. Run on an otherwise idle machine.

usage: python bench/grains_bench.py [--examples 50] [--n-steps 20] [--skip-naive]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
DATA = ROOT.parent / "shared" / "data" / "truthfulqa_dev.csv"


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class PeakRSS:
    """Sample RSS every 20 ms while the block runs; ``peak`` is the most above the starting value."""

    def __enter__(self):
        self.start, self.max, self._stop = rss_mb(), rss_mb(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.max = max(self.max, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.max = max(self.max, rss_mb())
        self.peak = self.max - self.start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=50)
    ap.add_argument("--n-steps", type=int, default=20)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from steering.backends.hf import run_job
    from steering.backends.hf.loading import load_model
    from steering.datasets import load_examples
    from steering.tasks.attribution.packed import integrated_gradients
    from steering.tasks.builders import BuildRequest, build, encode
    from steering.tasks.builders.registry import BuilderParams
    from steering.tasks.packing import answer_rows

    lm = load_model(None, device="cpu", dtype="float32")
    model_rss = rss_mb()
    examples = load_examples(DATA, f"0-{args.examples - 1}")
    params = {"n_steps": args.n_steps, "k": args.k}
    print(f"model {lm.name}, {lm.num_layers} layers, torch threads {torch.get_num_threads()}; "
          f"{len(examples)} TruthfulQA triples (rows 0-{args.examples - 1}), n_steps {args.n_steps}, k {args.k}")
    # Warm-up at full chunk sizes (the first large chunks pay for page faults and kernel set-up).
    build(lm, BuildRequest(examples[:6], "grains", params))

    data = encode(lm, examples, BuilderParams())
    rows = [answer_rows(e.prompt, [e.preferred, e.dispreferred]) for e in data]
    tokens = sum(sum(len(s.ids) for s in r) for r in rows)

    def run_ig() -> float:
        t0 = time.perf_counter()
        run_job(lambda ctx: integrated_gradients(ctx, rows, [[0.0, 1.0, -1.0]] * len(rows), args.n_steps), lm)
        return time.perf_counter() - t0

    def run_build():
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            res = build(lm, BuildRequest(examples, "grains", params))
            seconds = time.perf_counter() - t0
        return seconds, mem.max, mem.start, res

    # A B B A: IG alone, build, build, IG alone (drift cancels); report each and the ratio of the sums.
    ig1 = run_ig()
    b1, peak1, base, res = run_build()
    b2, peak2, _, _ = run_build()
    ig2 = run_ig()
    ours = (b1 + b2) / 2
    ig_alone = (ig1 + ig2) / 2
    print(f"\n(1) GrAInS build, all {lm.num_layers} layers: {b1:.1f} s and {b2:.1f} s wall (mean {ours:.1f} s), "
          f"peak RSS {max(peak1, peak2):.0f} MB (process; {model_rss:.0f} MB after loading the model)")
    print(f"    packed rows: {len(rows)} (prompt + both answers), {tokens} tokens, {tokens * args.n_steps} "
          f"token-rows of IG")
    print(f"(2) integrated-gradients passes alone: {ig1:.1f} s and {ig2:.1f} s (mean {ig_alone:.1f} s); overhead "
          f"ratio = {ours:.1f} / {ig_alone:.1f} = {ours / ig_alone:.3f} (target <= 1.15)")
    if args.skip_naive:
        return
    from grains_naive import build_naive

    triples = [(e.prompt, e.preferred, e.dispreferred) for e in examples]
    build_naive(lm.model, lm.tokenizer, lm.layers, triples[:3], k=args.k, n_steps=args.n_steps)  # warm-up
    with PeakRSS() as mem_n:
        t0 = time.perf_counter()
        naive = build_naive(lm.model, lm.tokenizer, lm.layers, triples, k=args.k, n_steps=args.n_steps)
        t_naive = time.perf_counter() - t0
    print(f"(3) naive build (Captum IG per example, one sequence at a time): {t_naive:.1f} s wall "
          f"(IG {naive['timings']['ig_seconds']:.1f} s, hidden states {naive['timings']['hidden_seconds']:.1f} s), "
          f"peak RSS {mem_n.max:.0f} MB; ratio naive / ours = {t_naive / ours:.2f} (target >= 2)")
    cos = [float(torch.dot(res.vector.values[i], naive["vectors"][i])) for i in range(lm.num_layers)]
    print(f"    agreement: cosine of the vectors per layer min {min(cos):.4f}, median "
          f"{sorted(cos)[len(cos) // 2]:.4f}, max {max(cos):.4f}")
    tok = lm.tokenizer
    same = total = 0
    for e, sel, mine in zip(data, naive["selected"], res.vector.metadata["info"]["selections"]):
        pos = [tok.decode([(e.prompt + e.preferred)[i]]) for i in sel[0]]
        neg = [tok.decode([(e.prompt + e.dispreferred)[i]]) for i in sel[1]]
        same += (sorted(pos) == sorted(mine["pos"])) + (sorted(neg) == sorted(mine["neg"]))
        total += 2
    print(f"    identical token selections: {same}/{total} (first {total // 2} examples, both polarities)")


if __name__ == "__main__":
    main()
