"""Naive reference implementation of GrAInS steering vectors, with Captum and plain transformers.

This is the computation the project implements efficiently, written the way a typical researcher would:
one example and one sequence at a time, full-vocabulary logits at every position via
``model(inputs_embeds=...).logits``, one forward per sequence for the hidden states. It is not artificially
slow: the IG steps go through Captum in a single call (``internal_batch_size = n_steps``), plain forwards run
under ``torch.no_grad`` and the model is in eval mode. The benchmark uses it (a) as the wall-time reference and
(b) to check that the project's vectors agree numerically.

Algorithm, per example (prompt, preferred, dispreferred):
  1. p = ids(prompt) (with special tokens), a = ids(sep + preferred), b = ids(sep + dispreferred) (without);
     S+ = p + a, S- = p + b.
  2. F(e_p, e_a, e_b) = sum_t log P(a_t | p, a_<t) - sum_t log P(b_t | p, b_<t), on input embeddings.
  3. Integrated gradients of F (zero baselines, Gauss-Legendre, n_steps), token score = signed sum of the
     attribution over the hidden dimension; S+ scores = cat(s_p, s_a), S- scores = cat(s_p, s_b).
  4. Non-special positions; top-k positive scores in S+, top-k most negative scores in S- (ties: lower position).
  5. Mask the selected positions with the replacement id (pad, else eos).
  6. Last-position output of every decoder layer for S+, masked S+, S-, masked S-; deltas original - masked.
Per layer: PCA (first right singular vector of the centred deltas, sign aligned with the mean) or mean of the
deltas, per polarity; v = u_pos - u_neg (mode "both") or u_pos (mode "pos"); unit-normalised.

usage: python bench/grains_naive.py [--examples 3] [--n-steps 20] [--k 10] [--layer 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from captum.attr import IntegratedGradients

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "truthfulqa_dev.csv"


# ----------------------------------------------------------------------------------------------------------
# pieces
# ----------------------------------------------------------------------------------------------------------

def tokenize_example(tokenizer, prompt: str, preferred: str, dispreferred: str, separator: str = " "):
    """Prompt ids (with special tokens) and the two answers' ids (without)."""
    p = list(tokenizer(prompt)["input_ids"])
    a = list(tokenizer(separator + preferred, add_special_tokens=False)["input_ids"])
    b = list(tokenizer(separator + dispreferred, add_special_tokens=False)["input_ids"])
    return p, a, b


def special_token_ids(tokenizer) -> set[int]:
    ids = {int(i) for i in tokenizer.all_special_ids}
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def _answer_logprob(model, e_prompt: torch.Tensor, e_answer: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the answer tokens given the prompt, per batch row. e_*: [B, len, d]."""
    P, A = e_prompt.shape[1], e_answer.shape[1]
    logits = model(inputs_embeds=torch.cat([e_prompt, e_answer], dim=1)).logits  # [B, P+A, V]
    logp = torch.log_softmax(logits[:, P - 1 : P - 1 + A].float(), dim=-1)       # position P-1+t scores a_t
    idx = answer_ids.view(1, A, 1).expand(logp.shape[0], A, 1)
    return logp.gather(-1, idx).squeeze(-1).sum(-1)                               # [B]


def make_objective(model, a_ids: Sequence[int], b_ids: Sequence[int]) -> Callable:
    """F(e_p, e_a, e_b) -> [B]: log P(a | p) - log P(b | p), one forward per sequence."""
    dev = model.get_input_embeddings().weight.device
    a_t = torch.tensor(a_ids, dtype=torch.long, device=dev)
    b_t = torch.tensor(b_ids, dtype=torch.long, device=dev)

    def forward_func(e_p: torch.Tensor, e_a: torch.Tensor, e_b: torch.Tensor) -> torch.Tensor:
        return _answer_logprob(model, e_p, e_a, a_t) - _answer_logprob(model, e_p, e_b, b_t)

    return forward_func


def embed_blocks(model, p, a, b):
    emb = model.get_input_embeddings()
    dev = emb.weight.device
    with torch.no_grad():
        return tuple(emb(torch.tensor([ids], dtype=torch.long, device=dev)) for ids in (p, a, b))  # each [1, n, d]


def ig_token_scores(model, p, a, b, n_steps: int = 20):
    """Integrated-gradients token scores (signed sum over the hidden dimension) of the three blocks."""
    forward_func = make_objective(model, a, b)
    inputs = embed_blocks(model, p, a, b)
    baselines = tuple(torch.zeros_like(x) for x in inputs)
    ig = IntegratedGradients(forward_func)
    attr = ig.attribute(inputs=inputs, baselines=baselines, n_steps=n_steps, method="gausslegendre",
                        internal_batch_size=n_steps)
    s_p, s_a, s_b = (t[0].sum(-1).detach().float().cpu() for t in attr)
    return s_p, s_a, s_b


def select_positions(ids: Sequence[int], scores: Sequence[float], special: set[int], k: int,
                     negative: bool) -> list[int]:
    """k non-special positions with the largest positive (or most negative) scores; ties: lower position first."""
    if negative:
        cand = [(s, i) for i, (t, s) in enumerate(zip(ids, scores)) if t not in special and s < 0]
        cand.sort(key=lambda x: (x[0], x[1]))
    else:
        cand = [(s, i) for i, (t, s) in enumerate(zip(ids, scores)) if t not in special and s > 0]
        cand.sort(key=lambda x: (-x[0], x[1]))
    return [i for _, i in cand[:k]]


def last_hidden_states(model, layers, ids: Sequence[int]) -> list[torch.Tensor]:
    """Output hidden state of every decoder layer at the last position, one forward."""
    out: list[torch.Tensor | None] = [None] * len(layers)

    def make_hook(j):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            out[j] = h[0, -1].detach().float().cpu().clone()
        return hook

    handles = [layer.register_forward_hook(make_hook(j)) for j, layer in enumerate(layers)]
    try:
        dev = model.get_input_embeddings().weight.device
        with torch.no_grad():
            model(input_ids=torch.tensor([list(ids)], dtype=torch.long, device=dev))
    finally:
        for h in handles:
            h.remove()
    return out  # type: ignore[return-value]


def _direction(D: torch.Tensor, aggregate: str) -> torch.Tensor:
    D = D.float()
    mean = D.mean(0)
    if aggregate == "mean":
        return mean
    if aggregate != "pca":
        raise ValueError(f"unknown aggregate {aggregate!r}")
    _, _, Vh = torch.linalg.svd(D - mean, full_matrices=False)
    u = Vh[0]
    if torch.dot(u, mean) < 0:
        u = -u
    return u


# ----------------------------------------------------------------------------------------------------------
# the reference
# ----------------------------------------------------------------------------------------------------------

def build_naive(model, tokenizer, layers, examples, *, k=10, n_steps=20, separator=" ",
                aggregate="pca", mode="both", replacement_id=None, progress=None) -> dict:
    """GrAInS steering vectors, one example and one sequence at a time (see the module docstring).

    Returns ``{"vectors": {layer: unit float32 [hidden]}, "raw_norms": {layer: float}, "selected": [(pos, neg)],
    "scores": [(scores S+, scores S-)], "timings": {"ig_seconds", "hidden_seconds", "total_seconds",
    "per_example": [{"ig_seconds", "hidden_seconds"}]}}``. ``progress(i, n)`` is called after each example with
    i = number of examples done.
    """
    if mode not in ("both", "pos"):
        raise ValueError(f"unknown mode {mode!r}")
    if aggregate not in ("pca", "mean"):
        raise ValueError(f"unknown aggregate {aggregate!r}")
    model.eval()
    if replacement_id is None:
        replacement_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    special = special_token_ids(tokenizer)
    n_layers = len(layers)

    t_start = time.perf_counter()
    ig_total = hidden_total = 0.0
    per_example = []
    selected, scores = [], []
    deltas_pos: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    deltas_neg: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

    for i, (prompt, preferred, dispreferred) in enumerate(examples):
        p, a, b = tokenize_example(tokenizer, prompt, preferred, dispreferred, separator)
        s_pos_ids, s_neg_ids = p + a, p + b

        t0 = time.perf_counter()
        s_p, s_a, s_b = ig_token_scores(model, p, a, b, n_steps=n_steps)
        t_ig = time.perf_counter() - t0
        sc_pos = torch.cat([s_p, s_a]).tolist()
        sc_neg = torch.cat([s_p, s_b]).tolist()

        pos_sel = select_positions(s_pos_ids, sc_pos, special, k, negative=False)
        neg_sel = select_positions(s_neg_ids, sc_neg, special, k, negative=True)

        t0 = time.perf_counter()
        if pos_sel:
            masked = list(s_pos_ids)
            for j in pos_sel:
                masked[j] = replacement_id
            h, hm = last_hidden_states(model, layers, s_pos_ids), last_hidden_states(model, layers, masked)
            for l in range(n_layers):
                deltas_pos[l].append(h[l] - hm[l])
        if neg_sel:
            masked = list(s_neg_ids)
            for j in neg_sel:
                masked[j] = replacement_id
            h, hm = last_hidden_states(model, layers, s_neg_ids), last_hidden_states(model, layers, masked)
            for l in range(n_layers):
                deltas_neg[l].append(h[l] - hm[l])
        t_hid = time.perf_counter() - t0

        ig_total += t_ig
        hidden_total += t_hid
        per_example.append({"ig_seconds": t_ig, "hidden_seconds": t_hid})
        selected.append((pos_sel, neg_sel))
        scores.append((sc_pos, sc_neg))
        if progress is not None:
            progress(i + 1, len(examples))

    if not deltas_pos[0]:
        raise ValueError("no example had a positive selection")
    if mode == "both" and not deltas_neg[0]:
        raise ValueError("no example had a negative selection")

    vectors, raw_norms = {}, {}
    for l in range(n_layers):
        v = _direction(torch.stack(deltas_pos[l]), aggregate)
        if mode == "both":
            v = v - _direction(torch.stack(deltas_neg[l]), aggregate)
        norm = float(v.norm())
        raw_norms[l] = norm
        vectors[l] = (v / norm).float() if norm > 0 else v.float()

    total = time.perf_counter() - t_start
    return {
        "vectors": vectors,
        "raw_norms": raw_norms,
        "selected": selected,
        "scores": scores,
        "timings": {"ig_seconds": ig_total, "hidden_seconds": hidden_total, "total_seconds": total,
                    "per_example": per_example},
    }


# ----------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------

def load_truthfulqa(n: int, path: Path = DATA) -> list[tuple[str, str, str]]:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if len(rows) >= n:
                break
            prompt = f"Q: {row['Question']}\nA:"
            rows.append((prompt, row["Best Answer"], row["Incorrect Answers"].split("; ")[0]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=3)
    ap.add_argument("--n-steps", type=int, default=20)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--aggregate", default="pca", choices=["pca", "mean"])
    ap.add_argument("--mode", default="both", choices=["both", "pos"])
    ap.add_argument("--no-completeness", action="store_true", help="skip the IG completeness check")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from steering.backends.hf.loading import load_model

    t0 = time.perf_counter()
    lm = load_model(None, device="cpu", dtype="float32")
    model, tokenizer, layers = lm.model, lm.tokenizer, lm.layers
    print(f"model loaded in {time.perf_counter() - t0:.1f} s ({len(layers)} layers)")

    examples = load_truthfulqa(args.examples)
    res = build_naive(model, tokenizer, layers, examples, k=args.k, n_steps=args.n_steps,
                      aggregate=args.aggregate, mode=args.mode,
                      progress=lambda i, n: print(f"  example {i}/{n} done", flush=True))

    tm = res["timings"]
    for i, e in enumerate(tm["per_example"]):
        print(f"example {i}: ig {e['ig_seconds']:.2f} s, hidden {e['hidden_seconds']:.2f} s")
    print(f"total: ig {tm['ig_seconds']:.2f} s, hidden {tm['hidden_seconds']:.2f} s, all {tm['total_seconds']:.2f} s")

    L = args.layer
    print(f"layer {L}: raw norm {res['raw_norms'][L]:.6f}, first 5 values {res['vectors'][L][:5].tolist()}")

    prompt, preferred, dispreferred = examples[0]
    p, a, b = tokenize_example(tokenizer, prompt, preferred, dispreferred)
    pos_sel, neg_sel = res["selected"][0]
    sc_pos, sc_neg = res["scores"][0]
    print("example 0 positive selection (S+):")
    for j in pos_sel:
        print(f"  pos {j:3d} {tokenizer.decode([(p + a)[j]])!r:>16} score {sc_pos[j]:+.5f}")
    print("example 0 negative selection (S-):")
    for j in neg_sel:
        print(f"  pos {j:3d} {tokenizer.decode([(p + b)[j]])!r:>16} score {sc_neg[j]:+.5f}")

    if not args.no_completeness:
        # IG completeness: the token scores of example 0 (prompt once, both answers) sum to F(x) - F(0).
        P = len(p)
        total_attr = sum(sc_pos) + sum(sc_neg[P:])
        f = make_objective(model, a, b)
        x = embed_blocks(model, p, a, b)
        with torch.no_grad():
            fx = float(f(*x)[0])
            f0 = float(f(*(torch.zeros_like(t) for t in x))[0])
        print(f"completeness (example 0): sum of scores {total_attr:+.6f}, F(x) - F(0) {fx - f0:+.6f} "
              f"(F(x) {fx:+.6f}, F(0) {f0:+.6f}), gap {total_attr - (fx - f0):+.3e} "
              f"({abs(total_attr - (fx - f0)) / max(abs(fx - f0), 1e-12):.2e} relative)")


if __name__ == "__main__":
    main()
