"""What an evaluation compares: named *conditions*, each a steering spec, always beside the unsteered model.

A condition's scales are absolute (as in a chat request) or ``relative``: fractions of each layer's mean
hidden-state norm recorded when the vector was built, the unit vector sweeps use. A relative application over
several layers becomes one application per layer, each with that layer's absolute scale (applications on
different layers never interact, so the result is the same as one application with per-layer scales).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from steering.engine.base import ModelFront, resolve_for
from steering.errors import InvalidRequestError, SteeringError, SteeringValidationError
from steering.spec import (
    Positions,
    ResolvedSteering,
    SteeringApplication,
    SteeringSpec,
    VectorLookup,
    stored_setting,
)
from steering.vectors import SteeringVector

UNSTEERED = "unsteered"
MAX_CONDITIONS = 16


@dataclass
class Condition:
    label: str
    spec: SteeringSpec | None
    """None: the unsteered model."""
    resolved: ResolvedSteering | None = None
    """The spec checked against the model (set by :func:`with_baseline`)."""

    def describe(self) -> list[dict[str, Any]] | None:
        return None if self.resolved is None else self.resolved.describe()


def relative_applications(vector: SteeringVector, scale: float, layers: Sequence[int] | None = None,
                          positions: Positions | Sequence[int] = "all", normalize: bool = True,
                          param: str = "steering") -> list[SteeringApplication]:
    """One application per layer with scale ``scale`` x that layer's recorded mean hidden-state norm."""
    norms = vector.metadata.get("hidden_norms") or {}
    layers = list(layers) if layers is not None else vector.layers
    missing = [x for x in layers if str(x) not in norms]
    if missing:
        raise InvalidRequestError(
            f"relative scales need the hidden-state norms recorded when the vector was built; "
            f"{vector.name or 'this vector'} has none for layers {missing} (use absolute scales)", param=param)
    return [SteeringApplication(vector, scale * float(norms[str(x)]), [x], positions, normalize) for x in layers]


def sweep_choice(vector: SteeringVector, param: str = "steering") -> SteeringApplication:
    """The setting a sweep chose: the vector's stored setting (applied by name without a scale), or for vectors
    built before settings were stored, the best (layer, scale) its build's sweep recorded."""
    if stored_setting(vector) is not None:
        return SteeringApplication(vector)
    sw = vector.metadata.get("sweep") or {}
    best = sw.get("best") or {}
    if "layer" not in best or "scale_abs" not in best:
        raise InvalidRequestError(f"no scale given and vector {vector.name!r} records no sweep result to take "
                                  "it from; give a scale and layers", param=param)
    return SteeringApplication(vector, float(best["scale_abs"]), [int(best["layer"])], sw.get("positions", "all"),
                               bool(sw.get("normalize", True)))


def label_for(name: str | None, layers: Sequence[int], scale: float, relative: bool) -> str:
    """``name@L3 x1.5``; ``name@L2,4 x0.5 rel`` for a relative scale."""
    layers = sorted(layers)
    contiguous = len(layers) >= 4 and all(b - a == 1 for a, b in zip(layers, layers[1:]))
    span = f"{layers[0]}-{layers[-1]}" if contiguous else ",".join(map(str, layers))
    return f"{name or 'inline'}@L{span} x{scale:g}{' rel' if relative else ''}"


def condition(spec: SteeringSpec, *, label: str | None = None, relative: bool = False,
              lookup: VectorLookup | None = None, param: str = "conditions[0]") -> Condition:
    """A condition from a request's steering. With ``relative``, every scale is a fraction of its vector's
    recorded per-layer hidden-state norms (so the vector must be registered, or carry them). Without a
    ``label``, one is made from the vector names, layers and scales."""

    def vector_of(j: int, app: SteeringApplication) -> SteeringVector:
        if isinstance(app.vector, SteeringVector):
            return app.vector
        if lookup is None:
            raise InvalidRequestError(f"{param}.steering.vectors[{j}]: no vector store to find {app.vector!r} in",
                                      param=f"{param}.steering.vectors[{j}].name")
        return lookup(app.vector)

    vectors = [vector_of(j, a) for j, a in enumerate(spec.applications)]
    if label is None:
        label = " + ".join(
            f"{a.name or 'inline'} (stored setting)" if a.scale is None and stored_setting(v) is not None else
            label_for(a.name, a.layers if a.layers is not None else v.layers, 1.0 if a.scale is None else a.scale,
                      relative)
            for a, v in zip(spec.applications, vectors, strict=True))
    if not relative:
        return Condition(label, spec)
    apps: list[SteeringApplication] = []
    for j, (app, vec) in enumerate(zip(spec.applications, vectors, strict=True)):
        where = f"{param}.steering.vectors[{j}]"
        if vec.name is None and not vec.metadata.get("hidden_norms"):
            raise InvalidRequestError(f"{where}: relative scales need a registered vector (its recorded "
                                      "hidden-state norms)", param=f"{param}.relative")
        if app.scale is None and stored_setting(vec) is not None:
            apps.append(app)  # the stored setting's scales are absolute already
            continue
        try:
            apps += relative_applications(vec, 1.0 if app.scale is None else app.scale, app.layers,
                                          app.positions or "all", bool(app.normalize), param=f"{param}.relative")
        except SteeringError as exc:
            raise InvalidRequestError(f"{where}: {exc.message}", param=exc.param) from None
    return Condition(label, SteeringSpec(apps))


def with_baseline(model: ModelFront, conditions: Sequence[Condition]) -> list[Condition]:
    """Check ``conditions`` against the model (resolving their steering) and put the unsteered baseline first."""
    if len(conditions) > MAX_CONDITIONS:
        raise InvalidRequestError(f"{len(conditions)} conditions; at most {MAX_CONDITIONS}", param="conditions")
    labels = [c.label for c in conditions]
    dup = sorted({x for x in labels if labels.count(x) > 1 or x == UNSTEERED})
    if dup:
        raise InvalidRequestError(f"condition labels must be unique and not {UNSTEERED!r}; repeated: {dup}",
                                  param="conditions")
    out = [Condition(UNSTEERED, None)]
    for i, c in enumerate(conditions):
        if c.spec is None:
            raise InvalidRequestError(f"conditions[{i}] has no steering (the unsteered baseline is always "
                                      "included)", param=f"conditions[{i}]")
        try:
            resolved = resolve_for(model, c.spec)
        except SteeringValidationError as exc:
            raise SteeringValidationError(f"conditions[{i}] ({c.label}): {exc.message}",
                                          param=f"conditions[{i}].{exc.param or 'steering'}") from None
        out.append(replace(c, resolved=resolved))
    return out
