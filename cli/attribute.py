"""``steerserve attribute``: which prompt tokens drove a continuation, as a coloured table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    ThreadsOpt,
    console,
    fail,
    load,
    out_console,
    parse_params,
    print_json,
    run_with_progress,
)


def attribute(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt (a user message with --chat).")],
    target: Annotated[str | None, typer.Option(help="The continuation to explain (appended as is).")] = None,
    preferred: Annotated[str | None, typer.Option(help="Contrastive: the preferred continuation.")] = None,
    dispreferred: Annotated[str | None, typer.Option(help="Contrastive: the dispreferred one.")] = None,
    method: Annotated[str, typer.Option(help="integrated_gradients, saliency, input_x_gradient, attention, "
                                             "attention_rollout, occlusion, reagent.")] = "integrated_gradients",
    param: Annotated[list[str], typer.Option("--param", help="Method parameter key=value (repeatable), "
                                                             "e.g. n_steps=64.")] = [],  # noqa: B006
    per_token: Annotated[bool, typer.Option(help="One row per target token.")] = False,
    max_tokens: Annotated[int, typer.Option(help="Without a target: greedy tokens to generate and explain.")] = 16,
    reduction: Annotated[str | None, typer.Option(help="Gradient methods: sum (default) or l2.")] = None,
    top_k: Annotated[int, typer.Option(help="Most positive / negative tokens to list.")] = 5,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = False,
    output: Annotated[Path | None, typer.Option(help="Also write the result as JSON here.")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Which prompt tokens drove a continuation (or a contrast between two), with progress."""
    import json

    from rich.table import Table

    from steering.backends.hf import HFEngine
    from steering.errors import SteeringError
    from steering.sampling import SamplingParams
    from steering.tasks.attribution import AttributionRequest, AttributionTarget
    from steering.tasks.attribution import attribute as run_attribution

    if (preferred is None) != (dispreferred is None):
        raise typer.BadParameter("give both --preferred and --dispreferred", param_hint="--preferred")
    if target is not None and preferred is not None:
        raise typer.BadParameter("give --target or --preferred/--dispreferred, not both", param_hint="--target")
    lm = load(model, device, dtype, threads)
    tok = lm.tokenizer
    enc = lm.inputs.encode_continuation

    try:
        ids = lm.inputs.encode_prompt(prompt, "chat" if chat else "raw")
        if preferred is not None:
            tgt = AttributionTarget.contrastive(enc(preferred), enc(dispreferred))
        else:
            if target is None:
                with HFEngine(lm) as engine:
                    cont = engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0)).token_ids
                console.print(f"[dim]explaining the greedy continuation:[/dim] {tok.decode(cont)!r}")
            else:
                cont = enc(target)
            tgt = (AttributionTarget.per_token if per_token else AttributionTarget.continuation)(cont)
        req = AttributionRequest(ids, tgt, method, parse_params(param), reduction)  # type: ignore[arg-type]
        res = run_with_progress(method, lambda cb: run_attribution(lm, req, on_progress=cb))
    except SteeringError as exc:
        fail(exc)
    data = {
        "method": res.method, "params": res.params, "target_type": res.target.kind, "prompt_ids": ids,
        "tokens": [tok.decode([t]) for t in ids], "special": res.special, "scores": res.scores.tolist(),
        "objective": res.objective, "info": res.info, "cost": res.cost.as_dict(),
    }
    if output is not None:
        from steering.files import atomic_write_text

        atomic_write_text(output, json.dumps(data, indent=2))
    if as_json:
        print_json({**data, "top_positive": res.top(top_k), "top_negative": res.top(top_k, negative=True),
                    "seconds": res.seconds})
        return
    totals = res.totals.tolist()
    table = Table(title=f"{method} ({res.target.kind}); objective {res.objective[0]:.4f}")
    table.add_column("pos", justify="right")
    table.add_column("token", overflow="fold")
    table.add_column("score", justify="right")
    peak = max((abs(v) for v in totals), default=1.0) or 1.0
    for i, (t, v) in enumerate(zip(ids, totals)):
        color = "green" if v > 0 else "red"
        mark = " [dim](special)[/dim]" if res.special[i] else ""
        table.add_row(str(i), repr(tok.decode([t])) + mark, f"[{color}]{v:+.4f}[/{color}]" + " " +
                      "#" * round(10 * abs(v) / peak))
    out_console().print(table)
    for label, picks in (("top positive", res.top(top_k)), ("top negative", res.top(top_k, negative=True))):
        console.print(f"{label}: " + ", ".join(f"{tok.decode([ids[i]])!r} {s:+.3f}" for i, s in picks))
    console.print(f"[dim]{res.cost.forward_passes} forwards, {res.cost.backward_passes} backwards, "
                  f"{res.seconds:.2f} s[/dim]")
