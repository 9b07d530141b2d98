"""The ``steerserve`` command: serve, generate, attribute, info, and the ``vectors`` and ``eval`` groups. It sits
above the core (:mod:`steering`) and beside the server (:mod:`server`)."""

from __future__ import annotations

import logging
import sys

import typer

from cli.attribute import attribute
from cli.common import DeviceOpt, DtypeOpt, ModelOpt, console, load
from cli.eval import app as eval_app
from cli.generate import generate
from cli.serve import serve
from cli.vectors import app as vectors_app

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="steerserve: inference-time steering for language models.")
app.command()(serve)
app.command()(generate)
app.command()(attribute)
app.add_typer(vectors_app, name="vectors")
app.add_typer(eval_app, name="eval")


@app.command()
def info(model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto") -> None:
    """Print the model's identity: layers, hidden size, context length, chat template."""
    lm = load(model, device, dtype)
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
