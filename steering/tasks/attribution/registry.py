"""Attribution methods, registered by name (like Inseq): each is a small class with a pydantic ``Params``
model and a ``run`` generator over a :class:`~steering.tasks.attribution.runner.Runner`."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from steering.engine.jobs import Progress
from steering.names import Registry
from steering.params import StrictParams


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


METHODS: Registry[type[AttributionMethod]] = Registry("attribution method", "method", "methods")
register = METHODS.register
method_names = METHODS.names
get_method = METHODS.get
parse_params = METHODS.parse_params
