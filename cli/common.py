"""Options and helpers shared by the ``steerserve`` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)

ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", envvar="STEERSERVE_MODEL",
    help="Hugging Face model directory or .gguf file; default: the embedded SmolLM2-135M-Instruct.")]
DeviceOpt = Annotated[str, typer.Option(envvar="STEERSERVE_DEVICE", help="auto, cpu, cuda, cuda:N")]
DirOpt = Annotated[Path, typer.Option("--vector-dir", envvar="STEERSERVE_VECTOR_DIR",
                                      help="Registry directory (the server's vector_dir).")]
RowsOpt = Annotated[str | None, typer.Option(help="Rows of the file to use, e.g. '0-49' (default: all).")]
DtypeOpt = Annotated[str, typer.Option(envvar="STEERSERVE_DTYPE", help="auto (bf16/fp16 on GPU, fp32 on CPU), "
                                                                       "float32, bfloat16, float16")]


def parse_layers(text: str | None) -> list[int] | None:
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


def parse_positions(text: str):
    if text in ("all", "prompt", "generated"):
        return text
    return [int(p) for p in text.split(",") if p.strip()]


def load(model, device, dtype):
    from steering.backends.hf.loading import load_model

    with console.status("loading model (the first run converts the default model once, ~30 s)..."):
        return load_model(model, device=device, dtype=dtype)


def parse_params(items: list[str]) -> dict:
    """``key=value`` pairs; values are read as JSON when they parse (numbers, true/false, null), else text."""
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected key=value, got {item!r}", param_hint="--param")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def progress_bar():
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), TaskProgressColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)


def run_with_bar(label: str, fn):
    """Run ``fn(on_progress)`` under a progress bar driven by the job's overall fraction."""
    with progress_bar() as bar:
        task = bar.add_task(label, total=1000)

        def on_progress(p) -> None:
            f = p.overall()
            bar.update(task, completed=int(1000 * f) if f is not None else None,
                       description=f"{label} {p.stage}".strip())

        out = fn(on_progress)
        bar.update(task, completed=1000)
        return out


def open_store(vector_dir: Path, lm=None):
    """The vector store in ``vector_dir``, checked against ``lm`` when given."""
    from steering.store import VectorStore

    store = VectorStore(vector_dir, lm.info.identity() if lm is not None else None)
    store.load_all()
    return store


def fail(exc) -> None:
    console.print(f"[red]error:[/red] {getattr(exc, 'message', exc)}")
    raise typer.Exit(2) from exc
