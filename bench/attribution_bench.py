"""Attribution benchmark on the embedded default model (SmolLM2-135M-Instruct), measured in one run.

Prints:
  (1) speed, 64-token prompt + 16-token answer, integrated gradients n_steps=32 (Gauss-Legendre, zero baseline):
      ours vs Captum's LLM API (``LLMGradientAttribution`` over ``LayerIntegratedGradients``: one IG per answer
      token) and vs Captum ``IntegratedGradients`` on a hand-written summed-log-probability function (one call),
      with the largest relative difference between ours and the latter;
  (2) speed, the per-token attribution matrix of a 32-token greedy generation, IG n_steps=32: ours vs Inseq's
      ``integrated_gradients`` (run in its own virtual environment, --inseq-python) and vs Captum's LLM API;
  (3) faithfulness: comprehensiveness (drop of log P(answer) when the top 20% of prompt tokens are removed)
      per method, divided by the same for random removal (5 draws), over 50 questions of TruthfulQA
      (``../shared/data/truthfulqa_dev.csv``, rows 0-49: the vector-building split, rows 0-199).
Run on an otherwise idle machine. Timings are medians of --repeats runs after one warm-up.

usage: python bench/attribution_bench.py [--repeats 3] [--questions 50] [--inseq-python PATH] [--skip-inseq]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steering.backends.hf import HFEngine  # noqa: E402
from steering.backends.hf.loading import load_model, resolve_model_dir  # noqa: E402
from steering.sampling import SamplingParams  # noqa: E402
from steering.tasks.attribution import (  # noqa: E402
    AttributionLimits,
    AttributionRequest,
    AttributionTarget,
    attribute,
    method_names,
)

DATA = ROOT.parent / "shared" / "data" / "truthfulqa_dev.csv"
INSEQ_PYTHON = "/work/venvs/inseq/bin/python"


def timed(fn, repeats: int, warmup: bool = True):
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def rows() -> list[dict]:
    with open(DATA, newline="") as fh:
        return list(csv.DictReader(fh))


def long_prompt(tok, n_tokens: int) -> list[int]:
    text = " ".join(f"Q: {r['Question']} A: {r['Best Answer']}." for r in rows()[:20])
    return tok(text, add_special_tokens=False)["input_ids"][:n_tokens]


# -- Captum references ---------------------------------------------------------------------------------------------
def captum_llm(lm, prompt_ids: list[int], target_ids: list[int], n_steps: int) -> torch.Tensor:
    """Captum's LLM API: LayerIntegratedGradients on the embedding layer, one IG run per target token."""
    from captum.attr import LayerIntegratedGradients, LLMGradientAttribution, TextTokenInput

    tok = lm.tokenizer
    lig = LayerIntegratedGradients(lm.model, lm.model.get_input_embeddings())
    llm = LLMGradientAttribution(lig, tok)
    inp = TextTokenInput(tok.decode(prompt_ids), tok, skip_tokens=[])
    res = llm.attribute(inp, target=torch.tensor(target_ids), n_steps=n_steps, method="gausslegendre")
    return res.token_attr


def captum_one_call(lm, prompt_ids: list[int], target_ids: list[int], n_steps: int) -> torch.Tensor:
    """Captum IntegratedGradients on input embeddings with the summed log-probability as the output."""
    from captum.attr import IntegratedGradients

    model, emb = lm.model, lm.model.get_input_embeddings()
    P = len(prompt_ids)
    tail_ids = torch.tensor(target_ids[:-1])
    tgt = torch.tensor(target_ids).view(1, -1, 1)

    def f(pe):
        tail = emb(tail_ids).unsqueeze(0).expand(pe.shape[0], -1, -1)
        logits = model(inputs_embeds=torch.cat([pe, tail], 1)).logits[:, P - 1:].float()
        return logits.log_softmax(-1).gather(-1, tgt.expand(pe.shape[0], -1, 1)).squeeze(-1).sum(-1)

    x = emb(torch.tensor(prompt_ids)).unsqueeze(0).detach()
    return IntegratedGradients(f).attribute(x, baselines=torch.zeros_like(x), n_steps=n_steps,
                                            method="gausslegendre")[0].sum(-1)  # [P]


INSEQ_SCRIPT = r'''
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
import inseq
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, prompt, generated = sys.argv[1], sys.argv[2], sys.argv[3]
n_steps, repeats = int(sys.argv[5]), int(sys.argv[6])
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(model_dir)
im = inseq.load_model(model, "integrated_gradients", tokenizer=tok)
def run():
    return im.attribute(input_texts=prompt, generated_texts=generated, n_steps=n_steps,
                        internal_batch_size=n_steps, step_scores=[], show_progress=False)
im.attribute(input_texts=prompt, generated_texts=prompt + generated[len(prompt):][:12], n_steps=n_steps,
             internal_batch_size=n_steps, step_scores=[], show_progress=False)  # warm-up on a short target
times = []
for _ in range(repeats):
    t0 = time.perf_counter(); out = run(); times.append(time.perf_counter() - t0)
a = out.sequence_attributions[0]
from importlib.metadata import version
print(json.dumps({"times": times, "version": version("inseq"), "shape": list(a.target_attributions.shape)}))
'''


def run_inseq(python: str, model_dir: str, prompt: str, generated: str, n_steps: int, repeats: int):
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(INSEQ_SCRIPT)
    try:
        proc = subprocess.run([python, fh.name, model_dir, prompt, generated, str(torch.get_num_threads()),
                               str(n_steps), str(repeats)], capture_output=True, text=True, timeout=3600)
    finally:
        os.unlink(fh.name)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- faithfulness --------------------------------------------------------------------------------------------------
def logprob(lm, prompt: list[int], answer: list[int]) -> float:
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits[0, len(prompt) - 1: -1].float().log_softmax(-1)
    return float(logits.gather(-1, torch.tensor(answer).unsqueeze(-1)).sum())


def comprehensiveness(lm, prompt: list[int], answer: list[int], drop: list[int], base: float) -> float:
    keep = [t for i, t in enumerate(prompt) if i not in set(drop)]
    return base - logprob(lm, keep, answer)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--questions", type=int, default=50)
    ap.add_argument("--inseq-python", default=INSEQ_PYTHON)
    ap.add_argument("--skip-inseq", action="store_true")
    ap.add_argument("--skip-speed", action="store_true", help="only the faithfulness part")
    ap.add_argument("--reagent-params", default='{"num_probes": 4, "max_steps": 8}',
                    help="ReAGent parameters for the faithfulness part (JSON; its defaults take minutes per "
                         "question on 2 CPU cores)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    lm = load_model(None, device="cpu", dtype="float32")
    tok = lm.tokenizer
    print(f"model {lm.name} on {lm.device} ({lm.dtype}), torch threads {torch.get_num_threads()}")

    if not args.skip_speed:
        # (1) 64 + 16 tokens, IG n_steps=32
        prompt = long_prompt(tok, 64)
        answer = tok(" The answer is that nobody knows for sure, but most historians agree on the date.",
                     add_special_tokens=False)["input_ids"][:16]
        assert len(prompt) == 64 and len(answer) == 16
        req = AttributionRequest(prompt, AttributionTarget.continuation(answer), "integrated_gradients",
                                 {"n_steps": 32})
        t_ours, ours = timed(lambda: attribute(lm, req), args.repeats)
        # The baselines run once each, after ours has warmed the process up.
        t_llm, llm_attr = timed(lambda: captum_llm(lm, prompt, answer, 32), 1, warmup=False)
        t_one, one = timed(lambda: captum_one_call(lm, prompt, answer, 32), args.repeats, warmup=False)
        rel = float((ours.scores[0] - one).abs().max() / one.abs().max())
        rel_llm = float((ours.scores[0] - llm_attr.sum(0)).abs().max() / llm_attr.sum(0).abs().max())
        print(f"\n(1) IG, 64-token prompt + 16-token answer, n_steps=32 (ours and one-call: median of "
              f"{args.repeats}; Captum LLM API: one run):")
        print(f"  ours                                    {t_ours:8.3f} s  ({ours.cost.forward_passes} forwards, "
              f"{ours.cost.backward_passes} backwards)")
        print(f"  Captum LLMGradientAttribution           {t_llm:8.3f} s  -> ours is {t_llm / t_ours:5.2f}x faster")
        print(f"  Captum IntegratedGradients, one call    {t_one:8.3f} s  -> ours is {t_one / t_ours:5.2f}x faster")
        print(f"  max relative difference: vs one-call {rel:.2e}; vs LLM API (its prefix is interpolated too, "
              f"so it is a different quantity) {rel_llm:.2e}")

        # (2) per-token matrix of a 32-token generation
        engine = HFEngine(lm).start()
        try:
            gen = engine.generate(prompt, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
        finally:
            engine.shutdown()
        generated = gen.token_ids
        req = AttributionRequest(prompt, AttributionTarget.per_token(generated), "integrated_gradients",
                                 {"n_steps": 32})
        t_mat, mat = timed(lambda: attribute(lm, req), args.repeats)
        t_llm2, _ = timed(lambda: captum_llm(lm, prompt, generated, 32), 1, warmup=False)
        print(f"\n(2) per-token IG matrix, 64-token prompt, {len(generated)}-token greedy generation, n_steps=32:")
        print(f"  ours                                    {t_mat:8.3f} s  ({mat.cost.forward_passes} forwards, "
              f"{mat.cost.backward_passes} backwards, matrix {tuple(mat.scores.shape)})")
        print(f"  Captum LLMGradientAttribution           {t_llm2:8.3f} s  -> ours is {t_llm2 / t_mat:5.2f}x faster")
        if args.skip_inseq:
            print("  Inseq: skipped (--skip-inseq)")
        elif not Path(args.inseq_python).exists():
            print(f"  Inseq: not run ({args.inseq_python} not found; see bench/INSEQ.md)")
        else:
            text = tok.decode(prompt)
            res = run_inseq(args.inseq_python, str(resolve_model_dir(None)[0]), text, tok.decode(prompt + generated),
                            32, 1)
            t_inseq = statistics.median(res["times"])
            print(f"  Inseq {res['version']} integrated_gradients  {t_inseq:8.3f} s  -> ours is "
                  f"{t_inseq / t_mat:5.2f}x faster (its attribution tensor {res['shape']})")

    # (3) faithfulness
    data = rows()[: args.questions]
    reagent_params = json.loads(args.reagent_params)
    limits = AttributionLimits()
    gen = torch.Generator().manual_seed(0)
    totals: dict[str, list[float]] = {m: [] for m in method_names()}
    rand: list[float] = []
    seconds: dict[str, float] = {m: 0.0 for m in method_names()}
    t_start = time.time()
    for qi, r in enumerate(data):
        prompt = tok(f"Q: {r['Question']}\nA:", add_special_tokens=False)["input_ids"]
        answer = tok(" " + r["Best Answer"], add_special_tokens=False)["input_ids"]
        base = logprob(lm, prompt, answer)
        k = max(1, math.ceil(0.2 * len(prompt)))
        for m in method_names():
            t0 = time.perf_counter()
            params = reagent_params if m == "reagent" else {}
            res = attribute(lm, AttributionRequest(prompt, AttributionTarget.continuation(answer), m, params),
                            limits=limits)
            seconds[m] += time.perf_counter() - t0
            order = sorted(range(len(prompt)), key=lambda i: res.scores[0, i].item(), reverse=True)
            totals[m].append(comprehensiveness(lm, prompt, answer, order[:k], base))
        draws = [comprehensiveness(lm, prompt, answer, torch.randperm(len(prompt), generator=gen)[:k].tolist(), base)
                 for _ in range(5)]
        rand.append(sum(draws) / len(draws))
        if (qi + 1) % 10 == 0:
            print(f"  ... {qi + 1}/{len(data)} questions ({time.time() - t_start:.0f} s)", flush=True)
    r_mean = statistics.mean(rand)
    print(f"\n(3) faithfulness over {len(data)} TruthfulQA questions (rows 0-{len(data) - 1}, vector-building "
          f"split), prompt 'Q: {{question}}\\nA:', target ' {{Best Answer}}', top 20% of prompt tokens removed:")
    print(f"  defaults for every method (IG: 32 Gauss-Legendre steps, zero baseline) except reagent {reagent_params}")
    print(f"  random removal: mean comprehensiveness {r_mean:.3f} nats")
    for m in method_names():
        c = statistics.mean(totals[m])
        wins = sum(a > b for a, b in zip(totals[m], rand))
        print(f"  {m:22s} comprehensiveness {c:7.3f} nats  ratio to random {c / r_mean:5.2f}  "
              f"(beats random on {wins}/{len(data)})  {seconds[m] / len(data):.3f} s/question")


if __name__ == "__main__":
    main()
