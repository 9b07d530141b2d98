"""Draw validation binary accuracy and perplexity ratio against scale for each method's chosen setting (its
layers, positions and normalize), from the JSON that ``bench/quality_search.py`` writes.

Several inputs are merged: a method's sweep rows are pooled across them (e.g. a second run at smaller scales) and
its chosen setting is the last input's; ``steerserve vectors sweep --output`` tables can be added to a method with
``METHOD=FILE.json`` (their ``best`` becomes the chosen setting).

usage: python bench/plot_quality.py IN.json [IN2.json | METHOD=SWEEP.json ...] OUT.png   (needs matplotlib)
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


def merged(paths: list[str]) -> dict:
    """One quality_search-shaped dict from every input (later inputs add rows and replace chosen settings)."""
    data: dict = {"methods": {}}
    for arg in paths:
        method, _, path = arg.rpartition("=") if "=" in arg else ("", "", arg)
        part = json.loads(Path(path).read_text())
        if method:  # a `vectors sweep --output` table
            part = {"methods": {method: {"setting": part["best"] or None, "sweep": part}}}
        for key in ("model", "budget"):
            if key in part:
                data[key] = part[key]
        for name, entry in part["methods"].items():
            have = data["methods"].setdefault(name, {"setting": None, "sweep": {"table": []}})
            if entry.get("sweep"):
                have["sweep"] = {**entry["sweep"], "table": have["sweep"]["table"] + entry["sweep"]["table"]}
            if entry.get("setting"):
                have["setting"] = entry["setting"]
    data.setdefault("budget", 1.2)
    return data


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(sys.argv) < 3:
        sys.exit(__doc__)
    data, dst = merged(sys.argv[1:-1]), Path(sys.argv[-1])
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
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    ticks = sorted({x for entry in methods.values() for x in series(entry)[0]})
    for ax in (acc_ax, ppl_ax):
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    model = data.get("model") or "SmolLM2-135M-Instruct"
    fig.suptitle(f"{model}: each method's chosen layers and positions, across scales")
    fig.tight_layout()
    dst.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
