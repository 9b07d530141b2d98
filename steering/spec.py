"""Steering specs: which vectors a request applies, where, and how strongly.

A spec holds one or more applications; each names a vector, a ``scale``, the ``layers`` it acts on, the
token ``positions`` it acts at and whether it ``normalize``s. Applications add up. Positions are absolute
token positions in the sequence (prompt tokens first, from 0), so steering by position does not depend on
whether a KV cache is used.

At a steered layer, with the sum N of the normalising applications and R of the others:
    h' = (h + N) * ||h|| / ||h + N|| + R          (norms over the hidden dimension, per token)
With only normalising applications this is the GrAInS rule h' = (h + s*v) ||h|| / ||h + s*v||.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Union

import torch

from steering.errors import SteeringValidationError
from steering.vectors import SteeringVector

PositionKind = Literal["all", "prompt", "generated"]
Positions = Union[PositionKind, tuple[int, ...]]
POSITION_KINDS = ("all", "prompt", "generated")


@dataclass
class SteeringApplication:
    vector: SteeringVector
    scale: float = 1.0
    layers: list[int] | None = None  # None: every layer the vector has values for
    positions: Positions = "all"
    normalize: bool = False

    def resolved_layers(self) -> list[int]:
        return sorted(self.layers) if self.layers is not None else self.vector.layers


@dataclass
class SteeringSpec:
    applications: list[SteeringApplication] = field(default_factory=list)

    @classmethod
    def single(cls, vector: SteeringVector, **kwargs) -> "SteeringSpec":
        return cls([SteeringApplication(vector=vector, **kwargs)])

    def validate(self, hidden_size: int, num_layers: int) -> None:
        """Check every application against the model before anything runs."""
        if not self.applications:
            raise SteeringValidationError("steering spec has no vectors", param="steering.vectors")
        for i, app in enumerate(self.applications):
            where = f"steering.vectors[{i}]"
            app.vector.validate(hidden_size, num_layers)
            if not isinstance(app.scale, (int, float)) or not math.isfinite(app.scale):
                raise SteeringValidationError(f"{where}.scale must be a finite number", param=f"{where}.scale")
            layers = app.resolved_layers()
            if not layers:
                raise SteeringValidationError(f"{where}.layers is empty", param=f"{where}.layers")
            if len(set(layers)) != len(layers):
                raise SteeringValidationError(f"{where}.layers has duplicates", param=f"{where}.layers")
            for layer in layers:
                if not 0 <= layer < num_layers:
                    raise SteeringValidationError(
                        f"{where}: layer {layer} does not exist; the model has layers 0..{num_layers - 1}",
                        param=f"{where}.layers",
                    )
                if layer not in app.vector.values:
                    raise SteeringValidationError(
                        f"{where}: the vector has no values for layer {layer}; it has layers {app.vector.layers}",
                        param=f"{where}.layers",
                    )
            pos = app.positions
            if isinstance(pos, str):
                if pos not in POSITION_KINDS:
                    raise SteeringValidationError(
                        f"{where}.positions must be one of {', '.join(POSITION_KINDS)} or a list of token positions",
                        param=f"{where}.positions",
                    )
            else:
                if not pos or any(not isinstance(p, int) or isinstance(p, bool) or p < 0 for p in pos):
                    raise SteeringValidationError(
                        f"{where}.positions must be a non-empty list of non-negative token positions",
                        param=f"{where}.positions",
                    )

    def describe(self) -> list[dict]:
        """What was applied, for responses and logs."""
        return [
            {
                "name": app.vector.name,
                "scale": app.scale,
                "layers": app.resolved_layers(),
                "positions": app.positions if isinstance(app.positions, str) else list(app.positions),
                "normalize": app.normalize,
            }
            for app in self.applications
        ]


@dataclass
class ResolvedApplication:
    """An application with its per-layer values already on the model's device and dtype."""

    values: dict[int, torch.Tensor]
    scale: float
    positions: Positions
    normalize: bool


def resolve(spec: SteeringSpec, device: torch.device, dtype: torch.dtype) -> list[ResolvedApplication]:
    out = []
    for app in spec.applications:
        if app.scale == 0:
            continue  # scale 0 is exactly unsteered
        layers = app.resolved_layers()
        out.append(
            ResolvedApplication(
                values={layer: app.vector.values[layer].to(device=device, dtype=dtype) for layer in layers},
                scale=float(app.scale),
                positions=app.positions if isinstance(app.positions, str) else tuple(app.positions),
                normalize=bool(app.normalize),
            )
        )
    return out
