"""The ``steerserve`` command: serve, generate, attribute, info, and the ``vectors`` and ``eval`` groups. It sits
above the core (:mod:`steering`) and beside the server (:mod:`server`)."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Annotated

import typer

import cli.common as common
from cli.attribute import attribute
from cli.common import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, ThreadsOpt, load
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

QUIET_CATEGORIES: tuple[type[Warning], ...] = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
"""Warning categories only dependencies raise (steerserve reports its own problems as errors, never as these)."""


def quiet_dependencies() -> None:
    """Keep dependencies' deprecation notices and download-style progress bars out of the output, unless the
    user asked for warnings (``-W`` or ``PYTHONWARNINGS``)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars
    if sys.warnoptions:
        return
    for category in QUIET_CATEGORIES:
        warnings.filterwarnings("ignore", category=category)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("steerserve")
    except PackageNotFoundError:
        return "unknown"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"steerserve {version()}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_show_version,
                                               help="Print the version and exit.")] = False,
    progress_seconds: Annotated[float, typer.Option(
        envvar=common.PROGRESS_ENV, show_envvar=True, min=0.05,
        help="When stderr is not a terminal, print a progress line (fraction, elapsed, ETA) this often; on a "
             "terminal, long commands show progress bars.")] = common.PROGRESS_SECONDS,
) -> None:
    """steerserve: inference-time steering for language models."""
    quiet_dependencies()
    common.progress_seconds = progress_seconds


@app.command()
def info(model: ModelOpt = None, device: DeviceOpt = "auto", dtype: DtypeOpt = "auto", threads: ThreadsOpt = None,
         as_json: JsonOpt = False) -> None:
    """Print the model's identity: layers, hidden size, context length, chat template."""
    lm = load(model, device, dtype, threads)
    data = {
        "name": lm.name, "source": lm.source, "architecture": type(lm.model).__name__,
        "num_layers": lm.num_layers, "hidden_size": lm.hidden_size, "max_model_len": lm.max_model_len,
        "device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch."),
        "chat_template": bool(getattr(lm.tokenizer, "chat_template", None)),
    }
    if as_json:
        common.print_json(data)
    else:
        common.out_console().print(data)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_dependencies()
    from steering.errors import ModelLoadError

    try:
        app()
    except ModelLoadError as exc:
        common.error_line(exc.message)
        sys.exit(2)


if __name__ == "__main__":
    main()
