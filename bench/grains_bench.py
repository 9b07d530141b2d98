"""GrAInS build benchmark on the embedded default model (SmolLM2-135M-Instruct): today's build against the fast
one, measured in one run.

Builds GrAInS vectors (every layer, k 10, the builder's default candidates and aggregation) from the TruthfulQA
triples of ``../shared/data/truthfulqa_dev.csv`` rows 0-199 (the vector-building split; prompt
'Q: {question}\\nA:', preferred = best answer, dispreferred = first incorrect answer), twice:
  old: integrated gradients in float32 with 20 Gauss-Legendre points (today's default);
  new: ``precision`` auto (bfloat16 matrix products with float32 accumulation on CPUs that have AVX512-BF16 or
       AMX; attention, the points nearest the zero baseline and the LM head's gradient in float32), 20 points,
       and the same with ``--fast-steps`` points
and prints:
  (1) the wall time of each build, the speed-up and peak memory (process RSS, sampled every 20 ms);
  (2) agreement: the cosine of the two vectors at every layer (min, median; tolerance >= 0.99 at every layer)
      and the share of identical token selections;
  (3) completeness on the first rows: |sum of scores - (F(x) - F(baseline))| / |F(x) - F(baseline)| per row
      (median, max) in float32 at several point counts and in bfloat16 at the default, where
      F = log P(y+|x) - log P(y-|x) (it does not converge on this model: see docs/experiments.md);
  and, right after the new build, a build that differs only after attribution (k 20, mode pos, aggregate
  pca) served from the cached scores, its wall time against the new build's.
``--per-point`` prints only the cost of one path point per token in float32 and in bfloat16. ``--path-profile``
prints only F along the straight path from the zero and the EOS-embedding baselines for four
rows (why the point count matters: F is far from smooth there). Optional: ``--reference`` also compares under
the reference code's selection (every token a candidate, template included, PCA), where the ranking of the scores
decides more.

``--before REV`` also builds today's vector with the code of git revision REV (float32, 20 points; in a
subprocess, from a temporary worktree, after the builds above) and compares the new and old builds with it: the
old build here differs from REV's only where this checkout changed the float32 arithmetic (the closed-form
gradient at the LM head), so this is the agreement with the build as it was.

The score cache is memory-only here and cleared before each timed build. Run on an otherwise idle machine.

usage: python bench/grains_bench.py [--rows 0-199] [--k 10] [--fast-steps 8] [--completeness-rows 8] [--reference]
                                    [--before REV]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "truthfulqa_dev.csv"
OLD = {"precision": "model", "n_steps": 20}
NEW = {"precision": "auto", "n_steps": 20}
REFERENCE = {"select_from": "sequence", "skip_template": False, "aggregate": "pca"}


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


def cosines(a, b) -> list[float]:
    return [float(torch.dot(a.values[x], b.values[x])) for x in sorted(a.values)]


def same_selections(a, b) -> tuple[int, int]:
    same = total = 0
    for x, y in zip(a.metadata["info"]["selections"], b.metadata["info"]["selections"], strict=True):
        same += (x["pos_at"] == y["pos_at"]) + (x["neg_at"] == y["neg_at"])
        total += 2
    return same, total


def objective_gap(lm, rows, weights) -> list[float]:
    """F(x) - F(baseline) per row (zero baseline), in float64 on the model's float32 weights."""
    from steering.backends.hf import run_job
    from steering.tasks.packing import pack, targets
    from steering.tasks.scoring import group_logprobs, packed_forward

    def work(ctx):
        emb = lm.model.get_input_embeddings()
        out = []
        for row, w in zip(rows, weights, strict=True):
            batch = pack([row, row], lm.pad_id, lm.device)
            tgt = targets(batch, [row, row])
            x = emb(batch.ids).detach()
            x[1] = 0.0
            lp = group_logprobs(lm, packed_forward(ctx, batch, embeds=x), tgt)
            f = [sum(float(lp[g]) * w[j] for g, (r, j) in enumerate(tgt[3]) if r == k) for k in (0, 1)]
            out.append(f[0] - f[1])
            yield from ()
        return out

    return run_job(work, lm)


def path_profile(lm, rows, alphas: list[float]) -> None:
    """F along the straight integrated-gradients path, per row and baseline (zeros, the EOS embedding)."""
    from steering.backends.hf import run_job
    from steering.tasks.packing import pack, targets
    from steering.tasks.scoring import group_logprobs, packed_forward

    emb = lm.model.get_input_embeddings()
    print("F(alpha) = log P(y+|x') - log P(y-|x') at x' = baseline + alpha (x - baseline), every token on the path")
    print("alpha:      " + " ".join(f"{a:7g}" for a in alphas))
    for base in ("zeros", "eos"):
        for k, row in enumerate(rows):
            def work(ctx, row=row, base=base):
                batch = pack([row] * len(alphas), lm.pad_id, lm.device)
                tgt = targets(batch, [row] * len(alphas))
                x = emb(batch.ids).detach()
                b = torch.zeros_like(x) if base == "zeros" else \
                    emb(torch.full_like(batch.ids, int(lm.tokenizer.eos_token_id))).detach()
                e = b + torch.tensor(alphas).view(-1, 1, 1) * (x - b)
                lp = group_logprobs(lm, packed_forward(ctx, batch, embeds=e), tgt).view(len(alphas), 2)
                yield from ()
                return (lp[:, 0] - lp[:, 1]).tolist()

            print(f"{base:5} row {k}: " + " ".join(f"{f:7.2f}" for f in run_job(work, lm)))


def per_point(lm, rows) -> None:
    """Seconds per packed token of one integrated-gradients path point, float32 against bfloat16 at every point."""
    from steering.backends.hf import run_job
    from steering.tasks.attribution.packed import integrated_gradients

    w = [[0.0, 1.0, -1.0]] * len(rows)
    tokens = 4 * sum(sum(len(s.ids) for s in r) for r in rows)
    times: dict[str, list[float]] = {"model": [], "bfloat16": []}
    for _ in range(3):
        for precision, seen in times.items():
            t0 = time.perf_counter()
            run_job(lambda ctx, p=precision: integrated_gradients(ctx, rows, w, 4, precision=p, exact_below=0.0), lm)
            seen.append(time.perf_counter() - t0)
    for precision, seen in times.items():
        print(f"{'float32 ' if precision == 'model' else 'bfloat16'}: " + " ".join(f"{t:.2f}" for t in seen)
              + f" s for {tokens} tokens; best {min(seen) / tokens * 1e3:.3f} ms per token")
    print(f"bfloat16 / float32 (best of each): {min(times['bfloat16']) / min(times['model']):.3f}")


BEFORE = r"""
import sys, time, torch
root, data, rows, k, threads, out = sys.argv[1:]
sys.path.insert(0, root)
torch.set_num_threads(int(threads))
from pathlib import Path
from steering.backends.hf.loading import load_model
from steering.datasets import load_examples
from steering.tasks.attribution import cache
from steering.tasks.builders import BuildRequest, build
lm = load_model(None, device="cpu", dtype="float32")
examples = load_examples(Path(data), rows)
cache.SCORES = cache.ScoreCache()
build(lm, BuildRequest(examples[:6], "grains", {"n_steps": 2}))
cache.SCORES.clear()
t0 = time.perf_counter()
vector = build(lm, BuildRequest(examples, "grains", {"k": int(k), "precision": "model", "n_steps": 20})).vector
vector.metadata["wall_s"] = time.perf_counter() - t0
vector.save(out)
"""


def build_before(rev: str, rows: str, k: int, threads: int):
    """Today's build (float32, 20 points) by the code of git revision ``rev``, in a subprocess from a temporary
    worktree; returns (wall seconds, vector)."""
    from steering.vectors import SteeringVector

    with tempfile.TemporaryDirectory(prefix="grains-before-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), rev], check=True)
        try:
            out = Path(tmp) / "before.safetensors"
            subprocess.run([sys.executable, "-c", BEFORE, str(tree), str(DATA), rows, str(k), str(threads), str(out)],
                           check=True, cwd=tmp)
            vector = SteeringVector.load(out)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)
    return float(vector.metadata["wall_s"]), vector


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="0-199")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--completeness-rows", type=int, default=8)
    ap.add_argument("--points", default="4,8,20,48", help="point counts for the completeness check")
    ap.add_argument("--fast-steps", type=int, default=8, help="also build with this many points (0: skip)")
    ap.add_argument("--reference", action="store_true", help="also compare under the reference code's selection")
    ap.add_argument("--path-profile", action="store_true", help="only print F along the IG path for 4 rows")
    ap.add_argument("--before", metavar="REV", help="also build with the code of this git revision and compare")
    ap.add_argument("--per-point", action="store_true",
                    help="only time one path point per token in float32 and in bfloat16 (every 5th row, 4 points, "
                         "three alternating repetitions)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from steering.backends.hf import run_job
    from steering.backends.hf.loading import load_model
    from steering.datasets import load_examples
    from steering.tasks.attribution import cache
    from steering.tasks.attribution.packed import integrated_gradients, resolve_precision
    from steering.tasks.builders import BuildRequest, build, encode
    from steering.tasks.builders.registry import BuilderParams
    from steering.tasks.packing import answer_rows

    lm = load_model(None, device="cpu", dtype="float32")
    examples = load_examples(DATA, args.rows)
    data = encode(lm, examples, BuilderParams())
    rows = [answer_rows(e.prompt, [e.preferred, e.dispreferred]) for e in data]
    tokens = sum(sum(len(s.ids) for s in r) for r in rows)
    if args.path_profile:
        path_profile(lm, rows[:4], [0, 1e-4, 1e-3, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0])
        return
    if args.per_point:
        per_point(lm, rows[::5])
        return
    print(f"model {lm.name}, {lm.num_layers} layers, torch threads {torch.get_num_threads()}; {len(examples)} "
          f"TruthfulQA triples (rows {args.rows}), {tokens} packed tokens, k {args.k}")
    print(f"old: float32, {OLD['n_steps']} points; new: precision {NEW['precision']} -> "
          f"{resolve_precision(lm, NEW['precision'])}, {NEW['n_steps']} points", flush=True)
    cache.SCORES = cache.ScoreCache()  # memory only: nothing from an earlier run
    build(lm, BuildRequest(examples[:6], "grains", {"n_steps": 2}))  # warm-up (page faults, kernels)

    def timed(params):
        cache.SCORES.clear()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            res = build(lm, BuildRequest(examples, "grains", params))
            seconds = time.perf_counter() - t0
        return seconds, mem.peak, res.vector

    t_new, m_new, v_new = timed({"k": args.k, **NEW})
    print(f"(1) new build: {t_new:.1f} s wall (peak RSS +{m_new:.0f} MB)", flush=True)
    t0 = time.perf_counter()
    again = build(lm, BuildRequest(examples, "grains", {**NEW, "k": 20, "mode": "pos", "aggregate": "pca"}))
    t_re = time.perf_counter() - t0
    print(f"    reuse: a build with k 20, mode pos, aggregate pca from the cached scores: {t_re:.1f} s "
          f"({t_re / t_new:.3f} of the new build; cache hits {cache.SCORES.hits}, misses {cache.SCORES.misses}); "
          f"layers {len(again.vector.layers)}")

    t_old, m_old, v_old = timed({"k": args.k, **OLD})
    print(f"    old build: {t_old:.1f} s wall (peak RSS +{m_old:.0f} MB); speed-up old / new = "
          f"{t_old / t_new:.2f}x (target: new < 300 s)")
    cos = cosines(v_old, v_new)
    same, total = same_selections(v_old, v_new)
    print(f"(2) cosine old vs new per layer: min {min(cos):.4f} (layer {cos.index(min(cos))}), median "
          f"{statistics.median(cos):.4f}; {'within' if min(cos) >= 0.99 else 'OUTSIDE'} the 0.99 tolerance; "
          f"identical selections {same}/{total} (first {total // 2} examples, both polarities)", flush=True)
    if args.before:
        t_before, v_before = build_before(args.before, args.rows, args.k, args.threads)
        print(f"    today's build by {args.before} (float32, 20 points, its own process): {t_before:.1f} s wall; "
              f"speed-up {args.before} / new = {t_before / t_new:.2f}x, {args.before} / old = "
              f"{t_before / t_old:.2f}x")
        for label, v in (("new", v_new), ("old", v_old)):
            cos = cosines(v_before, v)
            same, total = same_selections(v_before, v)
            print(f"    cosine {args.before} vs {label} per layer: min {min(cos):.4f} (layer {cos.index(min(cos))}), "
                  f"median {statistics.median(cos):.4f}; {'within' if min(cos) >= 0.99 else 'OUTSIDE'} the 0.99 "
                  f"tolerance; identical selections {same}/{total}", flush=True)
    if args.fast_steps:
        t_fast, _, v_fast = timed({"k": args.k, **NEW, "n_steps": args.fast_steps})
        cos = cosines(v_old, v_fast)
        same, total = same_selections(v_old, v_fast)
        print(f"    new with {args.fast_steps} points: {t_fast:.1f} s ({t_old / t_fast:.2f}x); cosine vs old min "
              f"{min(cos):.4f}, median {statistics.median(cos):.4f}; identical selections {same}/{total}",
              flush=True)

    sub = rows[: args.completeness_rows]
    w = [[0.0, 1.0, -1.0]] * len(sub)
    gap = objective_gap(lm, sub, w)
    print(f"(3) completeness on {len(sub)} rows: |sum(scores) - (F(x) - F(0))| / |F(x) - F(0)|, median and max "
          f"(|F(x) - F(0)| median {statistics.median(abs(g) for g in gap):.2f} nats)")
    points = [int(p) for p in args.points.split(",")]
    for precision in ("model", "bfloat16"):
        line = []
        for n in points if precision == "model" else [NEW["n_steps"]]:
            sc = run_job(lambda ctx, n=n, precision=precision: integrated_gradients(
                ctx, sub, w, n, precision=precision), lm)
            err = [abs(float(s.sum()) - g) / max(abs(g), 1e-9) for s, g in zip(sc, gap, strict=True)]
            line.append(f"n {n}: {statistics.median(err):.4f} / {max(err):.4f}")
        print(f"    {'float32 ' if precision == 'model' else 'bfloat16'}  " + "   ".join(line), flush=True)

    if args.reference:
        _, _, r_new = timed({"k": args.k, **REFERENCE, **NEW})
        _, _, r_old = timed({"k": args.k, **REFERENCE, **OLD})
        cos = cosines(r_old, r_new)
        same, total = same_selections(r_old, r_new)
        print(f"(5) reference selection (every token, PCA): cosine per layer min {min(cos):.4f}, median "
              f"{statistics.median(cos):.4f}; identical selections {same}/{total}")


if __name__ == "__main__":
    main()
