"""``steerserve vectors ...``: build, sweep and manage steering vectors in a local registry directory (the one
the server reads, ``$STEERSERVE_VECTOR_DIR``), with progress for the long jobs (bars on a terminal, plain lines
otherwise)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli.common import (
    DEFAULT_VECTOR_DIR,
    DeviceOpt,
    DirOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    RowsOpt,
    ThreadsOpt,
    console,
    fail,
    load,
    local_images,
    open_store,
    out_console,
    parse_layers,
    parse_params,
    print_json,
    run_with_progress,
)
from steering.datasets import DEFAULT_QA_TEMPLATE

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Build, sweep and manage steering vectors (local registry).")


def _sweep_table(res) -> Table:
    fl = res.fluency
    title = (f"sweep on {res.examples} examples ({res.metric}); unsteered: accuracy {res.baseline['accuracy']:.3f}, "
             f"margin {res.baseline['margin']:+.3f}")
    if fl:
        title += f"; fluency on {fl['prompts']} prompts x {fl['max_tokens']} tokens, budget {fl['budget']:g}"
    table = Table(title=title)
    cols = ["layers", "scale", "scale_abs", "positions", "normalize", "accuracy", "margin"]
    if fl:
        cols.append("ppl ratio")
    for col in cols:
        table.add_column(col, justify="right", overflow="fold")
    for r in res.table:
        mark = " *" if r is res.best else ""
        cells = [_span(r["layers"]), f"{r['scale']:g}{mark}", ",".join(f"{x:.3g}" for x in r["scale_abs"]),
                 str(r["positions"]), "on" if r["normalize"] else "off", f"{r['accuracy']:.3f}", f"{r['margin']:+.3f}"]
        if fl:
            ratio = r.get("perplexity_ratio")
            cells.append("-" if ratio is None else f"{ratio:.3f}" + ("" if r.get("within_budget") else " over"))
        table.add_row(*cells)
    return table


ScalesOpt = Annotated[str, typer.Option(help="Sweep scales, comma-separated.")]
RangesOpt = Annotated[str | None, typer.Option(
    "--layer-ranges", help="Sweep layer ranges that act together with the scale split between their layers, "
                           "';'-separated, e.g. '4-7;10-13'.")]
AbsoluteOpt = Annotated[bool, typer.Option(help="Sweep scales are absolute (default: fractions of each layer's mean "
                                                "hidden-state norm).")]
MetricOpt = Annotated[str, typer.Option(help="Sweep metric: accuracy or margin.")]
PositionsOpt = Annotated[str, typer.Option(help="Sweep positions: all, prompt or generated (the answer tokens), "
                                                "several comma-separated ('all,generated'), or explicit positions.")]
NormalizeOpt = Annotated[str, typer.Option(help="Sweep normalize: on, off or both.")]
BudgetOpt = Annotated[float | None, typer.Option(
    "--fluency-budget", help="Score fluency (perplexity ratio of greedy continuations of the first validation "
                             "prompts) and choose the best setting within this ratio, e.g. 1.2.")]
FluencyPromptsOpt = Annotated[int, typer.Option(help="Validation prompts continued for fluency.")]
FluencyTokensOpt = Annotated[int, typer.Option(help="Tokens per fluency continuation.")]


def _sweep_config(scales: str, layers: str | None, ranges: str | None, absolute: bool, metric: str, positions: str,
                  normalize: str, budget: float | None, fluency_prompts: int, fluency_tokens: int):
    from cli.common import parse_positions
    from steering.spec import POSITION_KINDS
    from steering.tasks.builders import FluencyConfig, SweepConfig

    kinds = [p.strip() for p in positions.split(",") if p.strip()]
    pos = kinds if kinds and all(k in POSITION_KINDS for k in kinds) else parse_positions(positions)
    if isinstance(pos, list) and len(pos) == 1 and isinstance(pos[0], str):
        pos = pos[0]
    if normalize not in ("on", "off", "both"):
        raise typer.BadParameter("normalize must be on, off or both", param_hint="--normalize")
    norm: bool | list[bool] = [True, False] if normalize == "both" else normalize == "on"
    layer_ranges = [parse_layers(r) or [] for r in ranges.split(";") if r.strip()] if ranges else []
    return SweepConfig(scales=[float(s) for s in scales.split(",") if s.strip()], layers=parse_layers(layers),
                       layer_ranges=layer_ranges, relative=not absolute,
                       metric=metric,  # type: ignore[arg-type]  # checked by check_sweep
                       positions=pos if isinstance(pos, str) or isinstance(pos[0], str)  # type: ignore[arg-type]
                       else tuple(pos),  # type: ignore[arg-type]
                       normalize=norm,
                       fluency=None if budget is None else FluencyConfig(fluency_prompts, fluency_tokens, budget))


@app.command()
def build(
    data: Annotated[Path, typer.Argument(help="Preference examples: .jsonl with prompt/preferred/dispreferred, "
                                              "or a TruthfulQA .csv (best answer vs first incorrect).")],
    name: Annotated[str, typer.Option(help="Name to save the vector under.")],
    method: Annotated[str, typer.Option(help="grains, caa, pca or probe.")] = "grains",
    rows: RowsOpt = None,
    param: Annotated[list[str], typer.Option("--param", help="Method parameter key=value (repeatable), e.g. "
                                                             "k=10, n_steps=20, mode=pos.")] = [],  # noqa: B006
    layers: Annotated[str | None, typer.Option(help="Layers to build, e.g. '10-20' (default: all).")] = None,
    validation: Annotated[Path | None, typer.Option(help="Validation examples: then sweep layers x scales.")] = None,
    validation_rows: Annotated[str | None, typer.Option(help="Rows of the validation file.")] = None,
    scales: ScalesOpt = "0.25,0.5,1,2",
    layer_ranges: RangesOpt = None,
    absolute: AbsoluteOpt = False,
    metric: MetricOpt = "accuracy",
    positions: PositionsOpt = "all",
    normalize: NormalizeOpt = "on",
    fluency_budget: BudgetOpt = None,
    fluency_prompts: FluencyPromptsOpt = 8,
    fluency_tokens: FluencyTokensOpt = 24,
    template: Annotated[str, typer.Option(help="TruthfulQA CSV prompt template.")] = DEFAULT_QA_TEMPLATE,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing vector of that name.")] = False,
    vector_dir: DirOpt = DEFAULT_VECTOR_DIR,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Build a steering vector from preference examples (one pass builds every layer), with progress."""
    from steering.datasets import load_examples
    from steering.errors import SteeringError
    from steering.store import check_name
    from steering.tasks.builders import BuildLimits, BuildRequest
    from steering.tasks.builders import build as run_build

    try:
        check_name(name)
        examples = load_examples(data, rows, template)
        val = load_examples(validation, validation_rows, template) if validation else None
        params = parse_params(param)
        if layers:
            params["layers"] = parse_layers(layers)
        lm = load(model, device, dtype, threads)
        reg = open_store(vector_dir, lm)
        if name in reg and not overwrite:
            raise typer.BadParameter(f"vector {name!r} exists in {vector_dir}; pass --overwrite", param_hint="--name")
        req = BuildRequest(examples, method, params, validation=val,
                           sweep=_sweep_config(scales, layers, layer_ranges, absolute, metric, positions, normalize,
                                               fluency_budget, fluency_prompts, fluency_tokens) if val else None)
        limits = BuildLimits(images=local_images())
        res = run_with_progress(f"{method} ({len(examples)} examples)",
                                lambda cb: run_build(lm, req, on_progress=cb, limits=limits))
        res.vector.metadata["source"] = "build"
        res.vector.metadata["data_file"] = str(data)
        reg.put(name, res.vector, overwrite=overwrite)
    except SteeringError as exc:
        fail(exc)
    if as_json:
        print_json({"name": name, "layers": res.vector.layers, "vector_dir": str(vector_dir),
                    "seconds": res.seconds, "sweep": None if res.sweep is None else res.sweep.as_dict()})
    elif res.sweep is not None:
        out_console().print(_sweep_table(res.sweep))
    console.print(f"saved [bold]{name}[/bold] ({len(res.vector.layers)} layers) to {vector_dir} in "
                  f"{res.seconds:.1f} s")


@app.command()
def sweep(
    name: Annotated[str, typer.Argument(help="Vector to sweep.")],
    data: Annotated[Path, typer.Argument(help="Validation examples (.jsonl or TruthfulQA .csv).")],
    rows: RowsOpt = None,
    scales: ScalesOpt = "0.25,0.5,1,2",
    layers: Annotated[str | None, typer.Option(help="Single layers (default: all of the vector's, or none with "
                                                    "--layer-ranges).")] = None,
    layer_ranges: RangesOpt = None,
    absolute: AbsoluteOpt = False,
    metric: MetricOpt = "accuracy",
    positions: PositionsOpt = "all",
    normalize: NormalizeOpt = "on",
    fluency_budget: BudgetOpt = None,
    fluency_prompts: FluencyPromptsOpt = 8,
    fluency_tokens: FluencyTokensOpt = 24,
    save: Annotated[bool, typer.Option(help="Store the chosen setting with the vector (used when a request names "
                                            "it without a scale).")] = False,
    template: Annotated[str, typer.Option(help="TruthfulQA CSV prompt template.")] = DEFAULT_QA_TEMPLATE,
    output: Annotated[Path | None, typer.Option(help="Write the table as JSON here.")] = None,
    vector_dir: DirOpt = DEFAULT_VECTOR_DIR,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score a vector's settings (layers and layer ranges x scales x positions x normalize) on validation examples
    (binary preferred vs dispreferred), optionally under a fluency budget, and optionally store the choice."""
    from steering.datasets import dataset_hash, load_examples
    from steering.errors import SteeringError
    from steering.files import atomic_write_text
    from steering.tasks.builders import BuildLimits
    from steering.tasks.builders import sweep as run_sweep
    from steering.tasks.builders.sweep import stored_setting

    try:
        examples = load_examples(data, rows, template)
        lm = load(model, device, dtype, threads)
        reg = open_store(vector_dir, lm)
        vec = reg.get(name)
        cfg = _sweep_config(scales, layers, layer_ranges, absolute, metric, positions, normalize, fluency_budget,
                            fluency_prompts, fluency_tokens)
        limits = BuildLimits(images=local_images())
        res = run_with_progress(f"sweep {name}", lambda cb: run_sweep(lm, vec, examples, cfg, on_progress=cb,
                                                                       limits=limits))
        setting = stored_setting(res, cfg, dataset_hash(examples)) if save else None
        if setting is not None:
            reg.put(name, replace(vec, metadata={**vec.metadata, "setting": setting}), overwrite=True)
    except SteeringError as exc:
        fail(exc)
    if as_json:
        print_json({**res.as_dict(), "stored": setting is not None})
    else:
        out_console().print(_sweep_table(res))
    if save:
        console.print(f"stored the chosen setting with [bold]{name}[/bold]" if setting is not None else
                      "[yellow]no setting was within the fluency budget; nothing stored[/yellow]")
    if output is not None:
        atomic_write_text(output, json.dumps(res.as_dict(), indent=2))


@app.command("list")
def list_(vector_dir: DirOpt = DEFAULT_VECTOR_DIR, as_json: JsonOpt = False) -> None:
    """List the vectors in the registry directory."""
    reg = open_store(vector_dir)
    rows = []
    for n in reg.names():
        v = reg.get(n)
        md = v.metadata
        rows.append({"name": n, "method": md.get("method", md.get("source")), "layers": v.layers,
                     "hidden_size": v.hidden_size, "model": (md.get("model") or {}).get("name"),
                     "examples": (md.get("dataset") or {}).get("examples"), "created_at": md.get("created_at"),
                     "setting": "setting" in md})
    if as_json:
        print_json({"vector_dir": str(vector_dir), "vectors": rows, "skipped": reg.skipped})
        return
    table = Table(title=str(vector_dir))
    for col in ("name", "method", "layers", "model", "examples", "created_at"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], str(r["method"] or ""), _span(r["layers"]), str(r["model"] or ""),
                      "" if r["examples"] is None else str(r["examples"]), str(r["created_at"] or ""))
    out_console().print(table)
    for f, why in reg.skipped.items():
        console.print(f"[yellow]skipped {f}:[/yellow] {why}", soft_wrap=True)


def _span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1 \
        else ",".join(map(str, layers))


@app.command()
def show(name: str, vector_dir: DirOpt = DEFAULT_VECTOR_DIR, as_json: JsonOpt = False) -> None:
    """Print a vector's metadata as JSON (highlighted on a terminal; plain with --json)."""
    try:
        v = open_store(vector_dir).get(name)
    except Exception as exc:  # noqa: BLE001
        fail(exc)
    data = {"name": name, "layers": v.layers, "hidden_size": v.hidden_size, "metadata": v.metadata}
    if as_json:
        print_json(data)
    else:
        out_console().print_json(json.dumps(data, default=str))


@app.command()
def delete(name: str, vector_dir: DirOpt = DEFAULT_VECTOR_DIR) -> None:
    """Delete a vector."""
    try:
        open_store(vector_dir).delete(name)
    except Exception as exc:  # noqa: BLE001
        fail(exc)
    console.print(f"deleted {name}")


@app.command()
def rename(name: str, new_name: str, overwrite: bool = False, vector_dir: DirOpt = DEFAULT_VECTOR_DIR) -> None:
    """Rename a vector (one atomic file rename)."""
    try:
        open_store(vector_dir).rename(name, new_name, overwrite)
    except Exception as exc:  # noqa: BLE001
        fail(exc)
    console.print(f"renamed {name} -> {new_name}")


@app.command("export-gguf")
def export_gguf(
    name: str, output: Path,
    scale: Annotated[float, typer.Option(help="Multiply the (unit-norm) values by this.")] = 1.0,
    vector_dir: DirOpt = DEFAULT_VECTOR_DIR,
) -> None:
    """Write a vector as a llama.cpp control vector (``--control-vector``); layer 0 is left out (llama.cpp
    cannot steer it)."""
    from steering.gguf_vectors import export_controlvector
    from steering.vectors import SteeringVector

    try:
        v = open_store(vector_dir).get(name)
        kept = {layer: t for layer, t in v.values.items() if layer > 0}
        hint = (v.metadata.get("model") or {}).get("model_type") or "llama"
        export_controlvector(SteeringVector(kept, name=name), output, model_hint=hint, scale=scale)
    except Exception as exc:  # noqa: BLE001
        fail(exc)
    note = " (layer 0 left out)" if 0 in v.values else ""
    console.print(f"wrote {output}: {len(kept)} layers{note}")


@app.command("import-gguf")
def import_gguf(
    path: Path, name: str, overwrite: bool = False, vector_dir: DirOpt = DEFAULT_VECTOR_DIR,
    model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", threads: ThreadsOpt = None,
) -> None:
    """Import a llama.cpp / repeng control vector GGUF into the registry (checked against the model)."""
    from steering.gguf_vectors import import_controlvector

    try:
        lm = load(model, device, dtype, threads)
        vec = import_controlvector(path, num_layers=lm.num_layers, hidden_size=lm.hidden_size)
        open_store(vector_dir, lm).put(name, vec, overwrite=overwrite)
    except Exception as exc:  # noqa: BLE001
        fail(exc)
    console.print(f"imported {path} as {name} ({len(vec.layers)} layers)")
