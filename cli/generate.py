"""``steerserve generate``: text from the local model, steered or not, streamed to stdout.

Steering takes the API's defaults (:data:`steering.spec.DEFAULT_SCALE`, ``DEFAULT_POSITIONS``,
``DEFAULT_NORMALIZE``, or the vector's stored setting when no ``--scale`` is given), so the same vector steers the
same way here and over HTTP. ``--vector`` is read (a file or a name in the store) before the model loads."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from cli.common import (
    DEFAULT_VECTOR_DIR,
    DeviceOpt,
    DirOpt,
    DtypeOpt,
    ModelOpt,
    ThreadsOpt,
    check_model,
    console,
    fail,
    load,
    open_store,
    parse_layers,
    parse_positions,
    read_vector,
)
from steering.spec import DEFAULT_NORMALIZE, DEFAULT_POSITIONS, DEFAULT_SCALE

_NORMALIZE = "on" if DEFAULT_NORMALIZE else "off"


def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt (a user message with --chat).")],
    model: ModelOpt = None,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = True,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 for greedy.")] = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    vector: Annotated[str | None, typer.Option(
        help="Steering vector: a file (.safetensors, or a llama.cpp control vector .gguf) or the name of a vector "
             "in --vector-dir.")] = None,
    vector_dir: DirOpt = DEFAULT_VECTOR_DIR,
    scale: Annotated[float | None, typer.Option(
        show_default=f"the vector's stored setting, else {DEFAULT_SCALE:g}, as in the API",
        help="Steering scale (absolute).")] = None,
    layers: Annotated[str | None, typer.Option(help="Layers to steer, e.g. '12,13' or '10-14'; default: every "
                                                    "layer of the vector (or of its stored setting).")] = None,
    positions: Annotated[str | None, typer.Option(
        show_default=f"the stored setting's, else {DEFAULT_POSITIONS}",
        help="all, prompt, generated, or token positions '3,4,5'.")] = None,
    normalize: Annotated[bool | None, typer.Option(
        show_default=f"the stored setting's, else {_NORMALIZE}",
        help="Keep each steered token's norm.")] = None,
    compare: Annotated[bool, typer.Option(help="Also print the unsteered output.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
) -> None:
    """Generate text, optionally steered by a vector (a file or a stored name); tokens stream to stdout."""
    from steering.errors import ModelLoadError, SteeringError
    from steering.spec import SteeringSpec

    lay = parse_layers(layers)
    pos = None if positions is None else parse_positions(positions)
    name = None
    vec = None
    try:
        check_model(model, device, dtype)
        if vector is not None:
            vec, name = read_vector(vector, vector_dir)
    except (ModelLoadError, SteeringError) as exc:
        fail(exc)
    lm = load(model, device, dtype, threads)
    spec = None
    if vec is not None:
        if name is not None:  # checked against the model as the server would (its recorded model)
            try:
                store = open_store(vector_dir, lm)
                skipped = store.skipped.get(f"{name}.safetensors")
                if skipped is not None:
                    fail(f"vector {name!r}: {skipped}")
                vec = store.get(name)
            except SteeringError as exc:
                fail(exc)
        spec = SteeringSpec.single(vec, scale=scale, layers=lay, positions=pos, normalize=normalize)
    _run(lm, prompt, chat, spec, compare, max_tokens, temperature, top_p, top_k, seed)


def _run(lm, prompt, chat, spec, compare, max_tokens, temperature, top_p, top_k, seed) -> None:
    from steering.backends.hf import HFEngine
    from steering.engine import GenerationRequest
    from steering.errors import SteeringError
    from steering.sampling import SamplingParams

    ids = lm.inputs.encode_prompt(prompt, "chat" if chat else "raw")
    runs = [("unsteered", None), ("steered", spec)] if (compare and spec) else [(None, spec)]
    engine = HFEngine(lm).start()
    try:
        for label, steering in runs:
            if label:
                console.rule(label)
            sp = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
            handle = engine.submit(GenerationRequest(ids, sp, steering))
            if steering is not None and handle.steering is not None:
                console.print(f"[dim]steering: {handle.steering.describe()}[/dim]", soft_wrap=True)
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
        fail(exc)
    finally:
        engine.shutdown()
