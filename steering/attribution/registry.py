"""Attribution methods, registered by name (like Inseq): each is a small class with a pydantic ``Params``
model and a ``run`` generator over a :class:`~steering.attribution.runner.Runner`."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from steering.errors import RequestValidationError
from steering.jobs import Progress
from steering.params import StrictParams
from steering.params import parse_params as parse


class MethodParams(StrictParams):
    """Base of every method's parameters: unknown names are rejected, not ignored."""


@dataclass
class MethodOutput:
    scores: torch.Tensor
    """[K, P]; for gradient methods [K, P, hidden] before reduction."""
    info: dict[str, Any] = field(default_factory=dict)


class AttributionMethod:
    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    gradient: ClassVar[bool] = False
    """True when scores carry the hidden dimension, reduced by signed sum or L2 norm."""
    summary: ClassVar[str] = ""

    def run(self, runner, params) -> Generator[Progress, None, MethodOutput]:  # pragma: no cover - abstract
        raise NotImplementedError


METHODS: dict[str, type[AttributionMethod]] = {}


def register(cls: type[AttributionMethod]) -> type[AttributionMethod]:
    if cls.name in METHODS:
        raise ValueError(f"attribution method {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> type[AttributionMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise RequestValidationError(
            f"unknown attribution method {name!r}; valid methods: {', '.join(method_names())}", param="method"
        ) from None


def parse_params(method: type[AttributionMethod], params: dict[str, Any] | None) -> MethodParams:
    return parse(method.Params, params, method.name)
