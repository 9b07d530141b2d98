"""Steering-vector builders, registered by name (like the attribution methods): each is a small class with a
pydantic ``Params`` model and a ``run`` job generator over encoded preference examples."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from steering.engine.jobs import JobContext, Progress
from steering.multimodal import PromptImage
from steering.names import Registry
from steering.params import StrictParams


class BuilderParams(StrictParams):
    """Parameters every builder takes; unknown names are rejected, not ignored."""

    layers: list[int] | None = Field(None, description="layers to build for (default: every layer)")
    prompt_format: Literal["raw", "chat"] = Field(
        "raw", description="raw: the prompt text as is; chat: the prompt as a user message in the chat template")
    system_prompt: str | None = Field(None, description="chat only: a system message before the prompt")
    separator: str | None = Field(None, description="text between prompt and answer (default ' ' for raw, "
                                                    "'' for chat)")


@dataclass
class Encoded:
    prompt: list[int]
    preferred: list[int]
    dispreferred: list[int]
    images: tuple[PromptImage, ...] = ()
    """The prompt's images (a vision-language model's examples), placed in ``prompt``."""


@dataclass
class Directions:
    """A builder's output: one direction per layer (any norm; stored unit-norm) and what to record of it."""

    values: dict[int, torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)
    per_layer: dict[str, dict[int, float]] = field(default_factory=dict)
    """Per-layer statistics for the metadata (e.g. the hidden-state norms, explained variance)."""


class Builder:
    name: ClassVar[str]
    Params: ClassVar[type[BuilderParams]] = BuilderParams
    summary: ClassVar[str] = ""

    @classmethod
    def cost(cls, data: list[Encoded], params) -> float:
        """Rough model work in token-forwards (progress weights): one packed forward over the data."""
        return float(sum(len(e.prompt) + len(e.preferred) + len(e.dispreferred) for e in data))

    def run(self, ctx: JobContext, data: list[Encoded], layers: list[int],
            params) -> Generator[Progress, None, Directions]:  # pragma: no cover - abstract
        raise NotImplementedError


BUILDERS: Registry[type[Builder]] = Registry("vector method", "method", "methods")
register = BUILDERS.register
builder_names = BUILDERS.names
get_builder = BUILDERS.get
parse_params = BUILDERS.parse_params


def principal_direction(d: torch.Tensor) -> tuple[torch.Tensor, float]:
    """First principal axis of the rows of ``d`` [N, h] (centred), unit norm, its sign chosen so that it
    points along the mean row; and the share of variance it explains."""
    d = d.to(torch.float64)
    centred = d - d.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    u = vh[0]
    if torch.dot(u, d.mean(0)) < 0:
        u = -u
    total = float((s ** 2).sum())
    return u.to(torch.float32), (float(s[0] ** 2) / total) if total > 0 else 0.0
