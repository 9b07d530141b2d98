"""``steerserve serve``: run the HTTP server (uvicorn); the other commands come from :mod:`steering.cli`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from steering.cli import app, main as _core_main


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="HF directory or .gguf; default: embedded "
                                                                       "SmolLM2-135M-Instruct")] = None,
    host: Annotated[Optional[str], typer.Option(help="Bind address [env STEERSERVE_HOST, default 127.0.0.1]")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port [env STEERSERVE_PORT, default 8000]")] = None,
    max_batch_size: Annotated[Optional[int], typer.Option(help="Sequences decoded together")] = None,
    max_queue_size: Annotated[Optional[int], typer.Option(help="Requests waiting before 503")] = None,
    max_model_len: Annotated[Optional[int], typer.Option(help="Longest prompt + completion")] = None,
    vector_dir: Annotated[Optional[Path], typer.Option(help="Directory of the steering-vector store")] = None,
    api_key: Annotated[Optional[str], typer.Option(help="Require 'Authorization: Bearer KEY' on /v1")] = None,
    served_model_name: Annotated[Optional[str], typer.Option(help="Model name clients send")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto, float32, bfloat16, float16")] = None,
    log_level: Annotated[Optional[str], typer.Option(help="uvicorn log level")] = None,
) -> None:
    """Serve the OpenAI-compatible API. Flags override STEERSERVE_* environment variables."""
    import uvicorn

    from server.app import create_app
    from server.settings import ServerSettings

    given = {k: v for k, v in dict(model=model, host=host, port=port, max_batch_size=max_batch_size,
                                   max_queue_size=max_queue_size, max_model_len=max_model_len,
                                   vector_dir=vector_dir, api_key=api_key, served_model_name=served_model_name,
                                   device=device, dtype=dtype, log_level=log_level).items() if v is not None}
    settings = ServerSettings(**given)
    logging.getLogger().setLevel(settings.log_level.upper())
    # The engine thread and the event loop share the GIL; a short switch interval lets the loop forward a
    # token as soon as the engine hands it over instead of waiting up to 5 ms per hand-off.
    sys.setswitchinterval(0.0005)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=35)


def main() -> None:
    _core_main()


if __name__ == "__main__":
    main()
