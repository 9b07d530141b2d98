"""``steerserve generate``: text from the local model, steered or not, streamed to stdout."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cli.common import DeviceOpt, DtypeOpt, ModelOpt, console, load, parse_layers, parse_positions


def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt (a user message with --chat).")],
    model: ModelOpt = None,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = True,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 for greedy.")] = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    vector: Annotated[Path | None, typer.Option(help="Steering vector (.safetensors).")] = None,
    scale: Annotated[float, typer.Option(help="Steering scale.")] = 4.0,
    layers: Annotated[str | None, typer.Option(help="Layers to steer, e.g. '12,13' or '10-14'; "
                                                       "default: every layer of the vector.")] = None,
    positions: Annotated[str, typer.Option(help="all, prompt, generated, or token positions '3,4,5'.")] = "all",
    normalize: Annotated[bool, typer.Option(help="Keep each steered token's norm.")] = True,
    compare: Annotated[bool, typer.Option(help="Also print the unsteered output.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Generate text, optionally steered by a vector file; tokens stream to stdout."""
    from steering.backends.hf import HFEngine
    from steering.engine import GenerationRequest
    from steering.errors import SteeringError
    from steering.sampling import SamplingParams
    from steering.spec import SteeringSpec
    from steering.vectors import SteeringVector

    lm = load(model, device, dtype)
    ids = lm.inputs.encode_prompt(prompt, "chat" if chat else "raw")
    spec = None
    if vector is not None:
        vec = SteeringVector.load(vector)
        spec = SteeringSpec.single(vec, scale=scale, layers=parse_layers(layers),
                                   positions=parse_positions(positions), normalize=normalize)
    runs = [("unsteered", None), ("steered", spec)] if (compare and spec) else [(None, spec)]
    engine = HFEngine(lm).start()
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
            assert last is not None  # a handle always ends with a finished delta
            if last.error is not None:
                raise last.error
            console.print(f"[dim]{last.num_generated_tokens} tokens, finish_reason={last.finish_reason}[/dim]")
    except SteeringError as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(2) from exc
    finally:
        engine.shutdown()
