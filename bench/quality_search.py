"""Choose steering settings under a fluency budget and measure them once, on TruthfulQA (``docs/experiments.md`` §4).

For each method (``grains`` with its defaults, ``caa``, ``pca``, ``probe``, and any GrAInS variants given with
``--grains-variant key=value,...``):
  1. build on rows 0-199 of ``../shared/data/truthfulqa_dev.csv`` (a GrAInS variant reuses the cached
     attribution scores, so it costs the activation pass only);
  2. sweep on rows 200-299: single layers and layer ranges x relative scales x positions (all, generated), with
     normalize, each setting's fluency scored on greedy continuations of the first validation questions; the
     chosen setting is the best binary accuracy within the perplexity-ratio budget, stored with the vector;
  3. measure the stored setting once on rows 300-399 (the vector named without a scale): binary, MC1, MC2 with
     exact McNemar p-values against the unsteered model, and the perplexity ratio of greedy continuations of
     those questions (the sweep's definition, on ``--measure-fluency`` questions).

Everything goes into ``--out`` (JSON: every sweep table, the chosen settings, the held-out reports), and the
vectors into ``--vector-dir`` (a registry directory; ``steerserve eval`` can use them afterwards). Prints one
summary table. ``bench/plot_quality.py`` draws accuracy and perplexity ratio against scale from the JSON.

usage: python bench/quality_search.py [--methods grains,caa,pca,probe] [--budget 1.2] [--out /tmp/exp/quality.json]
                                      [--layers 2,4,6] [--ranges "2,3,4,5"] [--scales 0.25,0.5]
                                      [--positions all,generated]
                                      [--grains-params n_steps=8] [--grains-variant k=20,mode=pos]
                                      [--model PATH.gguf]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "truthfulqa_dev.csv"
LAYERS = [2, 4, 6]
RANGES = [[2, 3, 4, 5]]
SCALES = [0.25, 0.5]
"""The grid measured in docs/experiments.md §5 (a sweep setting costs a scoring pass over the validation rows and
cache-less greedy continuations: about 17 s each on the 2-core CPU when nothing else runs)."""


def parse_variant(text: str) -> dict:
    out: dict = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v.strip()
    return out


def heldout_fluency(lm, vector, prompts, max_tokens: int) -> float:
    """Perplexity ratio of the stored setting's greedy continuations (the sweep's definition)."""
    from steering.backends.hf import run_job
    from steering.spec import SteeringApplication, SteeringSpec, resolve
    from steering.tasks.builders.sweep import greedy_continuations
    from steering.tasks.scoring import score_answers

    resolved = resolve(SteeringSpec([SteeringApplication(vector)]), hidden_size=lm.hidden_size,
                       num_layers=lm.num_layers)

    def work(ctx):
        app = ctx.steering(list(resolved.applications))
        stop = set(lm.eos_token_ids)
        base = yield from greedy_continuations(ctx, prompts, [[]] * len(prompts), max_tokens, stop)
        steered = yield from greedy_continuations(ctx, prompts, [app] * len(prompts), max_tokens, stop)
        out = []
        for conts in (base, steered):
            items = [(p, [c]) for p, c in zip(prompts, conts, strict=True) if c]
            scored = yield from score_answers(ctx, items, None)
            lp, n = sum(s.logprobs[0] for s in scored), sum(s.lengths[0] for s in scored)
            out.append(math.exp(-lp / n) if n else float("nan"))
        return out[1] / out[0]

    return run_job(work, lm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="grains,caa,pca,probe")
    ap.add_argument("--grains-params", default="",
                    help="the GrAInS build's parameters, e.g. precision=bfloat16,n_steps=8 (default: the builder's "
                         "own, 20 points and precision auto, about 4 minutes on 200 triples since §4's last change)")
    ap.add_argument("--grains-variant", action="append", default=[], help="e.g. k=20,mode=pos (repeatable; on top "
                                                                          "of --grains-params)")
    ap.add_argument("--budget", type=float, default=1.2)
    ap.add_argument("--fluency-prompts", type=int, default=8)
    ap.add_argument("--fluency-tokens", type=int, default=16)
    ap.add_argument("--measure-fluency", type=int, default=40, help="held-out questions continued for fluency")
    ap.add_argument("--out", type=Path, default=Path("/tmp/exp/quality.json"))
    ap.add_argument("--vector-dir", type=Path, default=Path("/tmp/exp/vecs"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None, help="a model path or GGUF file (default: the embedded default model)")
    ap.add_argument("--layers", default=",".join(map(str, LAYERS)))
    ap.add_argument("--ranges", default=";".join(",".join(map(str, r)) for r in RANGES), help="';'-separated")
    ap.add_argument("--scales", default=",".join(map(str, SCALES)))
    ap.add_argument("--positions", default="all,generated", help="swept positions, comma-separated")
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",") if x.strip()]
    ranges = [[int(x) for x in r.split(",")] for r in args.ranges.split(";") if r.strip()]
    scales = [float(x) for x in args.scales.split(",") if x.strip()]
    positions = [x.strip() for x in args.positions.split(",") if x.strip()]
    torch.set_num_threads(args.threads)

    from steering.backends.hf.loading import load_model
    from steering.datasets import load_examples, read_truthfulqa
    from steering.files import atomic_write_text
    from steering.spec import SteeringApplication, SteeringSpec
    from steering.store import VectorStore
    from steering.tasks.builders import BuildRequest, FluencyConfig, SweepConfig, build, encode
    from steering.tasks.builders.registry import BuilderParams
    from steering.tasks.evaluation import Condition
    from steering.tasks.evaluation.api import TruthfulQARequest, evaluate_truthfulqa

    lm = load_model(args.model, device="cpu", dtype="float32")
    store = VectorStore(args.vector_dir, lm.info.identity())
    store.load_all()
    build_rows, choose_rows = load_examples(DATA, "0-199"), load_examples(DATA, "200-299")
    items = read_truthfulqa(DATA)[300:400]
    measure_prompts = [e.prompt for e in encode(lm, load_examples(DATA, "300-399"), BuilderParams())]
    measure_prompts = measure_prompts[: args.measure_fluency]
    cfg = SweepConfig(scales=scales, layers=layers, layer_ranges=ranges, positions=positions,
                      normalize=True, fluency=FluencyConfig(args.fluency_prompts, args.fluency_tokens, args.budget))
    base = parse_variant(args.grains_params) if args.grains_params else {}
    runs = [(m, m, base if m == "grains" else {}) for m in args.methods.split(",") if m]
    runs += [("grains", "grains-" + v.replace("=", "").replace(",", "-"), {**base, **parse_variant(v)})
             for v in args.grains_variant]
    results: dict = {"model": lm.name, "budget": args.budget,
                     "sweep": {"layers": layers, "layer_ranges": ranges, "scales": scales,
                               "positions": positions, "normalize": True,
                               "fluency_prompts": args.fluency_prompts, "fluency_tokens": args.fluency_tokens},
                     "methods": {}}
    conditions = []
    for method, name, params in runs:
        t0 = time.perf_counter()
        res = build(lm, BuildRequest(build_rows, method, params, validation=choose_rows, sweep=cfg),
                    on_progress=None)
        seconds = time.perf_counter() - t0
        vec = res.vector
        store.put(name, vec, overwrite=True)
        vec = store.get(name)
        setting = vec.metadata.get("setting")
        entry = {"method": method, "params": params, "seconds": round(seconds, 1), "setting": setting,
                 "sweep": res.sweep.as_dict() if res.sweep else None}
        if setting is not None:
            entry["heldout_perplexity_ratio"] = round(heldout_fluency(lm, vec, measure_prompts,
                                                                      args.fluency_tokens), 4)
            conditions.append(Condition(name, SteeringSpec([SteeringApplication(vec)])))
        results["methods"][name] = entry
        best = res.sweep.best if res.sweep else {}
        print(f"{name}: built and swept in {seconds:.0f} s; chosen {best.get('layers')} x{best.get('scale')} "
              f"{best.get('positions')}: validation binary {best.get('accuracy')} (unsteered "
              f"{res.sweep.baseline['accuracy'] if res.sweep else None}), ppl ratio {best.get('perplexity_ratio')}",
              flush=True)
        atomic_write_text(args.out, json.dumps(results, indent=1))
    report = evaluate_truthfulqa(lm, TruthfulQARequest(items, conditions, source={"rows": "300-399"}))
    results["heldout"] = report.as_dict()
    atomic_write_text(args.out, json.dumps(results, indent=1))
    print(report.markdown())
    for name, entry in results["methods"].items():
        print(f"{name}: held-out perplexity ratio {entry.get('heldout_perplexity_ratio')}")


if __name__ == "__main__":
    main()
