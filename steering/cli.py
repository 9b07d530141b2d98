"""The ``steerserve`` command line: generate with or without steering on the local model."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from steering.cli_common import (
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    _load,
    _parse_layers,
    _parse_params,
    _parse_positions,
    console,
)
from steering.cli_eval import app as eval_app
from steering.cli_vectors import app as vectors_app

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="steerserve: inference-time steering for language models.")
app.add_typer(vectors_app, name="vectors")
app.add_typer(eval_app, name="eval")


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt (a user message with --chat).")],
    model: ModelOpt = None,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = True,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 for greedy.")] = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: Optional[int] = None,
    vector: Annotated[Optional[Path], typer.Option(help="Steering vector (.safetensors).")] = None,
    scale: Annotated[float, typer.Option(help="Steering scale.")] = 4.0,
    layers: Annotated[Optional[str], typer.Option(help="Layers to steer, e.g. '12,13' or '10-14'; "
                                                       "default: every layer of the vector.")] = None,
    positions: Annotated[str, typer.Option(help="all, prompt, generated, or token positions '3,4,5'.")] = "all",
    normalize: Annotated[bool, typer.Option(help="Keep each steered token's norm.")] = True,
    compare: Annotated[bool, typer.Option(help="Also print the unsteered output.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Generate text, optionally steered by a vector file; tokens stream to stdout."""
    from steering.engine import Engine, GenerationRequest
    from steering.errors import EngineError
    from steering.prompts import encode_chat, encode_text
    from steering.sampling import SamplingParams
    from steering.spec import SteeringSpec
    from steering.vectors import SteeringVector

    lm = _load(model, device, dtype)
    ids = encode_chat(lm.tokenizer, [{"role": "user", "content": prompt}]) if chat else encode_text(
        lm.tokenizer, prompt)
    spec = None
    if vector is not None:
        vec = SteeringVector.load(vector)
        spec = SteeringSpec.single(vec, scale=scale, layers=_parse_layers(layers),
                                   positions=_parse_positions(positions), normalize=normalize)
    runs = [("unsteered", None), ("steered", spec)] if (compare and spec) else [(None, spec)]
    engine = Engine(lm).start()
    try:
        for label, steering in runs:
            if label:
                console.rule(label)
            sp = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
            handle = engine.submit(GenerationRequest(ids, sp, steering))
            last = None
            for out in handle:
                sys.stdout.write(out.text)
                sys.stdout.flush()
                last = out
            sys.stdout.write("\n")
            if last is not None and last.error is not None:
                raise last.error
            console.print(f"[dim]{last.num_generated_tokens} tokens, finish_reason={last.finish_reason}[/dim]")
    except EngineError as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(2) from exc
    finally:
        engine.shutdown()


@app.command()
def attribute(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt (a user message with --chat).")],
    target: Annotated[Optional[str], typer.Option(help="The continuation to explain (appended as is).")] = None,
    preferred: Annotated[Optional[str], typer.Option(help="Contrastive: the preferred continuation.")] = None,
    dispreferred: Annotated[Optional[str], typer.Option(help="Contrastive: the dispreferred one.")] = None,
    method: Annotated[str, typer.Option(help="integrated_gradients, saliency, input_x_gradient, attention, "
                                             "attention_rollout, occlusion, reagent.")] = "integrated_gradients",
    param: Annotated[list[str], typer.Option("--param", help="Method parameter key=value (repeatable), "
                                                             "e.g. n_steps=64.")] = [],  # noqa: B006
    per_token: Annotated[bool, typer.Option(help="One row per target token.")] = False,
    max_tokens: Annotated[int, typer.Option(help="Without a target: greedy tokens to generate and explain.")] = 16,
    reduction: Annotated[Optional[str], typer.Option(help="Gradient methods: sum (default) or l2.")] = None,
    top_k: Annotated[int, typer.Option(help="Most positive / negative tokens to list.")] = 5,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = False,
    output: Annotated[Optional[Path], typer.Option(help="Also write the result as JSON here.")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Which prompt tokens drove a continuation (or a contrast between two), with a progress bar."""
    import json

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from steering.attribution import AttributionRequest, AttributionTarget
    from steering.attribution import attribute as run_attribution
    from steering.engine import Engine
    from steering.errors import EngineError
    from steering.prompts import encode_chat, encode_text
    from steering.sampling import SamplingParams

    if (preferred is None) != (dispreferred is None):
        raise typer.BadParameter("give both --preferred and --dispreferred", param_hint="--preferred")
    if target is not None and preferred is not None:
        raise typer.BadParameter("give --target or --preferred/--dispreferred, not both", param_hint="--target")
    lm = _load(model, device, dtype)
    tok = lm.tokenizer
    ids = encode_chat(tok, [{"role": "user", "content": prompt}]) if chat else encode_text(tok, prompt)

    def enc(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    try:
        if preferred is not None:
            tgt = AttributionTarget.contrastive(enc(preferred), enc(dispreferred))
        else:
            if target is None:
                with Engine(lm) as engine:
                    cont = engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0)).token_ids
                console.print(f"[dim]explaining the greedy continuation:[/dim] {tok.decode(cont)!r}")
            else:
                cont = enc(target)
            tgt = (AttributionTarget.per_token if per_token else AttributionTarget.continuation)(cont)
        req = AttributionRequest(ids, tgt, method, _parse_params(param), reduction)
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task(method, total=None)

            def on_progress(p) -> None:
                bar.update(task, completed=p.done, total=p.total, description=f"{method} {p.stage}".strip())

            res = run_attribution(lm, req, on_progress=on_progress)
    except EngineError as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(2) from exc
    totals = res.totals.tolist()
    table = Table(title=f"{method} ({res.target.kind}); objective {res.objective[0]:.4f}")
    table.add_column("pos", justify="right")
    table.add_column("token")
    table.add_column("score", justify="right")
    peak = max((abs(v) for v in totals), default=1.0) or 1.0
    for i, (t, v) in enumerate(zip(ids, totals)):
        color = "green" if v > 0 else "red"
        mark = " [dim](special)[/dim]" if res.special[i] else ""
        table.add_row(str(i), repr(tok.decode([t])) + mark, f"[{color}]{v:+.4f}[/{color}]" + " " +
                      "#" * round(10 * abs(v) / peak))
    Console().print(table)
    for label, picks in (("top positive", res.top(top_k)), ("top negative", res.top(top_k, negative=True))):
        console.print(f"{label}: " + ", ".join(f"{tok.decode([ids[i]])!r} {s:+.3f}" for i, s in picks))
    console.print(f"[dim]{res.cost.forward_passes} forwards, {res.cost.backward_passes} backwards, "
                  f"{res.seconds:.2f} s[/dim]")
    if output is not None:
        from steering.files import atomic_write_text

        atomic_write_text(output, json.dumps({
            "method": res.method, "params": res.params, "target_type": res.target.kind, "prompt_ids": ids,
            "tokens": [tok.decode([t]) for t in ids], "special": res.special, "scores": res.scores.tolist(),
            "objective": res.objective, "info": res.info, "cost": res.cost.as_dict(),
        }, indent=2))


@app.command()
def info(model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto") -> None:
    """Print the model's identity: layers, hidden size, context length, chat template."""
    lm = _load(model, device, dtype)
    console.print({
        "name": lm.name, "source": lm.source, "architecture": type(lm.model).__name__,
        "num_layers": lm.num_layers, "hidden_size": lm.hidden_size, "max_model_len": lm.max_model_len,
        "device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch."),
        "chat_template": bool(getattr(lm.tokenizer, "chat_template", None)),
    })


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from steering.errors import ModelLoadError

    try:
        app()
    except ModelLoadError as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        sys.exit(2)


if __name__ == "__main__":
    main()
