"""``steerserve serve``: run the HTTP server (uvicorn). Its options are generated from
:class:`server.settings.ServerSettings`, so every setting has a flag; a flag overrides its ``STEERSERVE_*``
environment variable, which overrides the default."""

from __future__ import annotations

import inspect
import json
import logging
import types
import typing
from typing import Any

import typer

from server.settings import ServerSettings

_ENV = ServerSettings.model_config.get("env_prefix", "")


def _flag_type(annotation: Any) -> Any:
    """The option type for a settings field: its type without ``None`` (the option's default is None: unset);
    lists and mappings are given as JSON."""
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
    params = []
    for name, field in ServerSettings.model_fields.items():
        default = "none" if field.default is None else field.default
        help_ = f"{field.description or name} (env {_ENV}{name.upper()}, default {default})"
        flags = [f"--{name.replace('_', '-')}"] + (["-m"] if name == "model" else [])
        params.append(inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, annotation=typing.Optional[_flag_type(field.annotation)],  # noqa: UP045
            default=typer.Option(None, *flags, help=help_, show_default=False)))
    return params


def serve(**given: Any) -> None:
    """Serve the OpenAI-compatible API."""
    from server.app import create_app
    from server.run import build_server

    given = {k: v for k, v in given.items() if v is not None}
    for name in _json_fields() & set(given):
        try:
            given[name] = json.loads(given[name])
        except ValueError as exc:
            raise typer.BadParameter(f"--{name.replace('_', '-')} takes JSON: {exc}") from None
    settings = ServerSettings(**given)
    logging.getLogger().setLevel(settings.log_level.upper())
    build_server(create_app(settings), settings).run()


serve.__signature__ = inspect.Signature(_options(), return_annotation=None)  # type: ignore[attr-defined]
