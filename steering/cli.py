"""The ``steerserve`` command line: generate with or without steering on the local model."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="steerserve: inference-time steering for language models.")
console = Console(stderr=True)

ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", envvar="STEERSERVE_MODEL",
    help="Hugging Face model directory or .gguf file; default: the embedded SmolLM2-135M-Instruct.")]
DeviceOpt = Annotated[str, typer.Option(envvar="STEERSERVE_DEVICE", help="auto, cpu, cuda, cuda:N")]
DtypeOpt = Annotated[str, typer.Option(envvar="STEERSERVE_DTYPE", help="auto (bf16/fp16 on GPU, fp32 on CPU), "
                                                                       "float32, bfloat16, float16")]


def _parse_layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def _parse_positions(text: str):
    if text in ("all", "prompt", "generated"):
        return text
    return [int(p) for p in text.split(",") if p.strip()]


def _load(model, device, dtype):
    from steering.loading import load_model

    with console.status("loading model (the first run converts the default model once, ~30 s)..."):
        return load_model(model, device=device, dtype=dtype)


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
