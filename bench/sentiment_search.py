"""Choose a sentiment steering setting under a fluency budget and measure it once (``docs/experiments.md`` §6).

For each method (CAA and GrAInS with its defaults, built from ``docs/data/sentiment_pairs.jsonl`` in the chat
template, or read from ``--vector-dir`` when already there):
  1. choose on the selection prompts (``docs/data/neutral_prompts.txt``): greedy continuations in the chat template
     under every setting of the grid (single layers x relative scales, and a layer range with the scale split
     between its layers, x positions all / generated, normalize on); the VADER compound shift from the unsteered
     texts and the perplexity ratio (the steered text's perplexity under the unsteered model over the unsteered
     text's own); the chosen setting is the largest shift whose ratio is within ``--budget``;
  2. measure the chosen setting once on the held-out prompts (``docs/data/neutral_prompts_test.txt``).
Prints both tables and writes everything to ``--out`` (JSON).

usage: python bench/sentiment_search.py [--methods caa,grains] [--budget 1.2] [--layers 4,6,8,10,12]
                                        [--scales 0.15,0.2,0.25,0.3] [--range 6-10 --range-scales 0.3,0.45,0.6]
                                        [--out /tmp/exp/sentiment.json] [--vector-dir /tmp/exp/sent_vecs]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "docs" / "data"
CHUNK = 15
"""Conditions per evaluation (the evaluation takes at most 16, the unsteered baseline added first)."""


def settings(layers: list[int], scales: list[float], span: list[int] | None, span_scales: list[float]):
    """(label, layers, relative scale per layer, positions)."""
    out = []
    for pos in ("all", "generated"):
        for x in layers:
            for s in scales:
                out.append((f"L{x} x{s:g} {pos}", [x], s, pos))
        if span:
            for s in span_scales:
                out.append((f"L{span[0]}-{span[-1]} x{s:g} {pos}", span, s / len(span), pos))
    return out


def evaluate(engine, vector, grid, prompts: list[str], max_tokens: int) -> list[dict]:
    """One row per setting: VADER shift, its standard error, perplexity ratio, distinct-2, tokens."""
    from steering.spec import SteeringSpec
    from steering.tasks.evaluation.conditions import condition, relative_applications
    from steering.tasks.evaluation.steer import SteerEvalRequest, prepare_steer, start_steer

    rows = []
    for k in range(0, len(grid), CHUNK):
        part = grid[k:k + CHUNK]
        conds = [condition(SteeringSpec(relative_applications(vector, s, layers, pos, True)), label=label)
                 for label, layers, s, pos in part]
        req = SteerEvalRequest(prompts, conds, "sentiment", chat=True, max_tokens=max_tokens, samples=0)
        report = start_steer(engine, prepare_steer(engine, req)).result()
        for (label, layers, s, pos), c in zip(part, report.conditions[1:], strict=True):
            vs = c.versus_baseline
            rows.append({"setting": label, "layers": layers, "scale_per_layer": s, "positions": pos,
                         "shift": vs["score"]["diff"], "shift_se": vs["score"]["stderr"],
                         "ppl_ratio": vs["perplexity"]["ratio"], "distinct2": c.metrics.get("distinct_2"),
                         "tokens": c.metrics.get("tokens"), "score": c.metrics["score"]})
        base = report.conditions[0].metrics
        print(f"    {k + len(part)}/{len(grid)} settings scored (unsteered VADER {base['score']:.3f})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="caa,grains")
    ap.add_argument("--budget", type=float, default=1.2)
    ap.add_argument("--layers", default="4,6,8,10,12")
    ap.add_argument("--scales", default="0.15,0.2,0.25,0.3")
    ap.add_argument("--range", default="6-10", help="a layer range the scale is split over ('' for none)")
    ap.add_argument("--range-scales", default="0.3,0.45,0.6")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/exp/sentiment.json"))
    ap.add_argument("--vector-dir", type=Path, default=Path("/tmp/exp/sent_vecs"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from steering.backends.hf import EngineConfig, HFEngine, load_model
    from steering.datasets import load_examples
    from steering.store import VectorStore
    from steering.tasks.builders import BuildRequest, build

    lm = load_model(None, device="cpu", dtype="float32")
    store = VectorStore(args.vector_dir, lm.info.identity())
    store.load_all()
    pairs = load_examples(DATA / "sentiment_pairs.jsonl")
    selection = (DATA / "neutral_prompts.txt").read_text().splitlines()
    held_out = (DATA / "neutral_prompts_test.txt").read_text().splitlines()
    layers = [int(x) for x in args.layers.split(",") if x]
    scales = [float(x) for x in args.scales.split(",") if x]
    span = list(range(int(args.range.split("-")[0]), int(args.range.split("-")[1]) + 1)) if args.range else None
    grid = settings(layers, scales, span, [float(x) for x in args.range_scales.split(",") if x])
    results: dict = {"budget": args.budget, "grid": [g[0] for g in grid], "methods": {}}
    with HFEngine(lm, EngineConfig(max_batch_size=32)).start() as engine:
        for method in args.methods.split(","):
            name = f"sent_{method}"
            t0 = time.perf_counter()
            if name not in store:
                vec = build(lm, BuildRequest(pairs, method, {"prompt_format": "chat"})).vector
                store.put(name, vec)
            vec = store.get(name)
            built = time.perf_counter() - t0
            print(f"{method}: vector ready in {built:.0f} s; choosing over {len(grid)} settings", flush=True)
            rows = evaluate(engine, vec, grid, selection, args.max_tokens)
            within = [r for r in rows if r["ppl_ratio"] is not None and r["ppl_ratio"] <= args.budget]
            best = max(within, key=lambda r: r["shift"]) if within else None
            measured = None
            if best is not None:
                pick = [g for g in grid if g[0] == best["setting"]]
                measured = evaluate(engine, vec, pick, held_out, args.max_tokens)[0]
            results["methods"][method] = {"build_seconds": round(built, 1), "selection": rows, "chosen": best,
                                          "held_out": measured}
            args.out.write_text(json.dumps(results, indent=1))
            print(f"{method}: chosen {best and best['setting']} (selection shift {best and best['shift']:+.3f}, "
                  f"ratio {best and best['ppl_ratio']:.3f}); held-out shift "
                  f"{measured and measured['shift']:+.3f} ± {measured and measured['shift_se']:.3f}, ratio "
                  f"{measured and measured['ppl_ratio']:.3f}" if best else f"{method}: no setting within the budget",
                  flush=True)
    print("\nselection prompts (VADER shift / perplexity ratio):")
    for label in results["grid"]:
        cells = []
        for method, res in results["methods"].items():
            row = next(r for r in res["selection"] if r["setting"] == label)
            cells.append(f"{method} {row['shift']:+.3f} ({row['ppl_ratio']:.2f})")
        print(f"  {label:24s} " + "   ".join(cells))


if __name__ == "__main__":
    main()
