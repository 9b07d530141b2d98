"""Draw validation binary accuracy and perplexity ratio against scale for each method's chosen setting (its
layers, positions and normalize), from the JSON that ``bench/quality_search.py`` writes.

usage: python bench/plot_quality.py /tmp/exp/quality.json docs/quality_scale.png   (needs matplotlib)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def series(entry: dict) -> tuple[list[float], list[float], list[float]]:
    setting = entry["setting"]
    rows = [r for r in entry["sweep"]["table"]
            if r["layers"] == setting["layers"] and r["positions"] == setting["positions"]
            and r["normalize"] == setting["normalize"]]
    rows.sort(key=lambda r: r["scale"])
    return ([r["scale"] for r in rows], [r["accuracy"] for r in rows],
            [r["perplexity_ratio"] or float("nan") for r in rows])


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    data = json.loads(src.read_text())
    methods = {k: v for k, v in data["methods"].items() if v.get("setting")}
    fig, (acc_ax, ppl_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    baseline = None
    for name, entry in methods.items():
        scales, acc, ppl = series(entry)
        s = entry["setting"]
        span = f"{s['layers'][0]}-{s['layers'][-1]}" if len(s["layers"]) > 1 else str(s["layers"][0])
        label = f"{name} (L{span}, {s['positions']})"
        acc_ax.plot(scales, acc, marker="o", label=label)
        ppl_ax.plot(scales, ppl, marker="o", label=label)
        baseline = entry["sweep"]["baseline"]["accuracy"]
    if baseline is not None:
        acc_ax.axhline(baseline, color="grey", linestyle="--", label="unsteered")
    ppl_ax.axhline(data["budget"], color="red", linestyle="--", label=f"budget {data['budget']:g}")
    acc_ax.set(xlabel="relative scale", ylabel="binary accuracy (rows 200-299)", xscale="log",
               title="TruthfulQA validation accuracy")
    ppl_ax.set(xlabel="relative scale", ylabel="perplexity ratio (greedy continuations)", xscale="log",
               yscale="log", title="fluency")
    for ax in (acc_ax, ppl_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: each method's chosen layers and positions, across scales")
    fig.tight_layout()
    dst.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
