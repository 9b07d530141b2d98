"""What an evaluation compares: named *conditions*, each a steering spec, always beside the unsteered model.

A condition's scales are absolute (as in a chat request) or ``relative``: fractions of each layer's mean
hidden-state norm recorded when the vector was built, the unit vector sweeps use. A relative application over
several layers becomes one application per layer, each with that layer's absolute scale (applications on
different layers never interact, so the result is the same as one application with per-layer scales).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from steering.errors import RequestValidationError, SteeringValidationError
from steering.loading import LoadedModel
from steering.spec import ResolvedApplication, SteeringApplication, SteeringSpec, resolve
from steering.vectors import SteeringVector

UNSTEERED = "unsteered"
MAX_CONDITIONS = 16


@dataclass
class Condition:
    label: str
    spec: SteeringSpec | None
    """None: the unsteered model."""

    def describe(self) -> list[dict] | None:
        return None if self.spec is None else self.spec.describe()


def relative_applications(vector: SteeringVector, scale: float, layers: Sequence[int] | None = None,
                          positions="all", normalize: bool = True, param: str = "steering") -> list[SteeringApplication]:
    """One application per layer with scale ``scale`` x that layer's recorded mean hidden-state norm."""
    norms = vector.metadata.get("hidden_norms") or {}
    layers = list(layers) if layers is not None else vector.layers
    missing = [x for x in layers if str(x) not in norms]
    if missing:
        raise RequestValidationError(
            f"relative scales need the hidden-state norms recorded when the vector was built; "
            f"{vector.name or 'this vector'} has none for layers {missing} (use absolute scales)", param=param)
    return [SteeringApplication(vector, scale * float(norms[str(x)]), [x], positions, normalize) for x in layers]


def sweep_choice(vector: SteeringVector, param: str = "steering") -> SteeringApplication:
    """The best (layer, scale) recorded by the sweep of a build with validation examples."""
    sw = vector.metadata.get("sweep") or {}
    best = sw.get("best") or {}
    if "layer" not in best or "scale_abs" not in best:
        raise RequestValidationError(f"no scale given and vector {vector.name!r} records no sweep result to take "
                                     "it from; give a scale and layers", param=param)
    pos = sw.get("positions", "all")
    return SteeringApplication(vector, float(best["scale_abs"]), [int(best["layer"])],
                               pos if isinstance(pos, str) else tuple(pos), bool(sw.get("normalize", True)))


def with_baseline(lm: LoadedModel, conditions: Sequence[Condition]) -> list[Condition]:
    """Validate ``conditions`` against the model and put the unsteered baseline first."""
    if len(conditions) > MAX_CONDITIONS:
        raise RequestValidationError(f"{len(conditions)} conditions; at most {MAX_CONDITIONS}", param="conditions")
    labels = [c.label for c in conditions]
    dup = sorted({x for x in labels if labels.count(x) > 1 or x == UNSTEERED})
    if dup:
        raise RequestValidationError(f"condition labels must be unique and not {UNSTEERED!r}; repeated: {dup}",
                                     param="conditions")
    for i, c in enumerate(conditions):
        if c.spec is None:
            raise RequestValidationError(f"conditions[{i}] has no steering (the unsteered baseline is always "
                                         "included)", param=f"conditions[{i}]")
        try:
            c.spec.validate(lm.hidden_size, lm.num_layers)
        except SteeringValidationError as exc:
            raise SteeringValidationError(f"conditions[{i}] ({c.label}): {exc.message}",
                                          param=f"conditions[{i}].{exc.param or 'steering'}") from None
    return [Condition(UNSTEERED, None), *conditions]


def resolved(lm: LoadedModel, condition: Condition) -> list[ResolvedApplication]:
    return [] if condition.spec is None else resolve(condition.spec, lm.device, lm.dtype)


def label_for(name: str | None, layers: Sequence[int], scale: float, relative: bool) -> str:
    """``name@L3 x1.5``; ``name@L2,4 x0.5 rel`` for a relative scale."""
    layers = sorted(layers)
    span = ",".join(map(str, layers)) if len(layers) < 4 or layers != list(range(layers[0], layers[-1] + 1)) \
        else f"{layers[0]}-{layers[-1]}"
    return f"{name or 'inline'}@L{span} x{scale:g}{' rel' if relative else ''}"
