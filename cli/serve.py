"""``steerserve serve``: run the HTTP server (uvicorn). Its options are generated from
:class:`server.settings.ServerSettings`, so every setting has a flag, shown in ``--help`` with its default and its
``STEERSERVE_*`` environment variable; a flag overrides the variable, which overrides the default.

The model and the vector directory are checked before uvicorn starts (a missing model path or a directory that
cannot be written is one line on stderr and exit status 2), and a model that fails to load while the server starts
stops it with exit status 2, so a supervisor sees the failure."""

from __future__ import annotations

import inspect
import json
import logging
import types
import typing
from typing import Any

import typer

from cli.common import ThreadsOpt, apply_threads, check_model, fail, quiet_transformers
from server.settings import ServerSettings

_ENV = ServerSettings.model_config.get("env_prefix", "")
LOAD_FAILED_EXIT = 2
"""Exit status of ``serve`` when the model cannot be loaded (before or after uvicorn started)."""


def env_name(name: str) -> str:
    return f"{_ENV}{name.upper()}"


def _flag_type(annotation: Any) -> Any:
    """The option type for a settings field: its type without ``None`` (an unset optional stays None); lists and
    mappings are given as JSON."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(args[0]) if len(args) == 1 else str
    if typing.get_origin(annotation) in (list, dict):
        return str
    return annotation


def _json_fields() -> set[str]:
    return {name for name, f in ServerSettings.model_fields.items() if _flag_type(f.annotation) is str
            and typing.get_origin(f.annotation) in (list, dict)}


def _options() -> list[inspect.Parameter]:
    json_fields = _json_fields()
    params = []
    for name, field in ServerSettings.model_fields.items():
        flag = f"--{name.replace('_', '-')}"
        kind = _flag_type(field.annotation)
        decls = [f"{flag}/--no-{flag[2:]}" if kind is bool else flag] + (["-m"] if name == "model" else [])
        default = field.get_default(call_default_factory=True)
        if name in json_fields:
            default = json.dumps(default)
        help_ = field.description or name
        if name in json_fields and "JSON" not in help_:
            help_ += " (JSON)"
        params.append(inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY,
            annotation=typing.Optional[kind],  # noqa: UP045 - a runtime annotation for typer
            default=typer.Option(default, *decls, help=help_, envvar=env_name(name), show_envvar=True,
                                 show_default=default is not None)))
    params.append(inspect.Parameter("threads", inspect.Parameter.KEYWORD_ONLY, annotation=ThreadsOpt, default=None))
    return params


def settings_from_options(given: dict[str, Any]) -> ServerSettings:
    """The settings from the options (None: unset); an invalid value is a usage error naming its flag."""
    from pydantic import ValidationError

    given = {k: v for k, v in given.items() if v is not None}
    for name in _json_fields() & set(given):
        try:
            given[name] = json.loads(given[name])
        except ValueError as exc:
            raise typer.BadParameter(f"takes JSON: {exc}", param_hint=f"--{name.replace('_', '-')}") from None
    try:
        return ServerSettings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{str(e['loc'][0]).replace('_', '-')} ({env_name(str(e['loc'][0]))}): {e['msg']}"
            if e["loc"] else e["msg"] for e in exc.errors())
        raise typer.BadParameter(problems) from None


def serve(**given: Any) -> None:
    """Serve the OpenAI-compatible API (and the steering, job and evaluation endpoints)."""
    from server.app import create_app
    from server.run import build_server
    from steering.errors import ModelLoadError
    from steering.store import VectorDirError, check_writable

    threads = given.pop("threads", None)
    settings = settings_from_options(given)
    logging.getLogger().setLevel(settings.log_level.upper())
    try:
        hf = settings.backend == "hf"
        check_model(settings.model, settings.device if hf else None, settings.dtype if hf else None)
        check_writable(settings.vector_dir)
    except (ModelLoadError, VectorDirError) as exc:
        fail(exc, LOAD_FAILED_EXIT)
    apply_threads(threads)
    quiet_transformers()
    try:
        app = create_app(settings)
    except (ValueError, OSError) as exc:  # e.g. an unreadable api_keys_file
        fail(exc)
    server = build_server(app, settings, stop_on_load_error=True)
    server.run()
    if server.load_error is not None:  # the lifespan logged the reason in one line
        raise typer.Exit(LOAD_FAILED_EXIT)


serve.__signature__ = inspect.Signature(_options(), return_annotation=None)  # type: ignore[attr-defined]
