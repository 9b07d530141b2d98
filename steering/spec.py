"""Steering specs: which vectors a request applies, where, and how strongly.

A :class:`SteeringSpec` is plain, device-free data that travels with a request: one or more applications, each
naming a registered vector (or carrying one inline), a ``scale``, the ``layers`` it acts on, the token
``positions`` it acts at and whether it ``normalize``s. It serialises to JSON-able data (:meth:`to_dict`), so
it can cross a process boundary. A backend turns it into a :class:`ResolvedSteering` with :func:`resolve`,
the one place a spec is checked against a model (hidden size, layers, positions, finite values).

Positions are absolute token positions in the sequence (prompt tokens first, from 0), so steering by position
does not depend on whether a KV cache is used. At a steered layer, with the sum N of the normalising
applications and R of the others:
    h' = (h + N) * ||h|| / ||h + N|| + R          (norms over the hidden dimension, per token)
With only normalising applications this is the GrAInS rule h' = (h + s*v) ||h|| / ||h + s*v||.

A vector given without a ``scale`` steers with its stored setting (:func:`stored_setting`: the layers,
per-layer scales, positions and normalize a sweep chose under a fluency budget), where it has one; positions and
normalize given in the request still win. Without a stored setting the scale is 1, positions ``all`` and
normalize off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from steering.errors import NotFoundError, SteeringValidationError
from steering.vectors import SteeringVector

PositionKind = Literal["all", "prompt", "generated", "image"]
Positions = PositionKind | tuple[int, ...]
POSITION_KINDS: tuple[str, ...] = ("all", "prompt", "generated", "image")
"""``prompt``: every prompt token (image tokens included); ``generated``: the generated tokens' states; ``image``:
the tokens a prompt's images fill (bound to their positions per request by :func:`bind_images`)."""
MAX_APPLICATIONS = 16

# The defaults of one application, shared by every entry point (the HTTP API, ``steerserve generate``): a vector
# given without a scale steers with its stored setting, else with these.
DEFAULT_SCALE = 1.0
"""The scale of a vector given without a scale that has no stored setting."""
DEFAULT_POSITIONS: PositionKind = "all"
"""Where a vector acts when neither the request nor its stored setting says."""
DEFAULT_NORMALIZE = False
"""Whether a steered token keeps its norm when neither the request nor the stored setting says."""


def parse_positions(value: Any, param: str = "positions") -> Positions:
    """A position kind, or a sorted tuple of distinct non-negative token positions."""
    if isinstance(value, str):
        if value not in POSITION_KINDS:
            raise SteeringValidationError(
                f"{param} must be one of {', '.join(POSITION_KINDS)} or a list of token positions", param=param)
        return value  # type: ignore[return-value]
    try:
        items = list(value)
    except TypeError:
        raise SteeringValidationError(f"{param} must be a position kind or a list of token positions",
                                      param=param) from None
    if not items or any(not isinstance(p, int) or isinstance(p, bool) or p < 0 for p in items):
        raise SteeringValidationError(f"{param} must be a non-empty list of non-negative token positions",
                                      param=param)
    return tuple(sorted(set(items)))


def describe_positions(positions: Positions) -> str | list[int]:
    return positions if isinstance(positions, str) else list(positions)


@dataclass
class SteeringApplication:
    vector: str | SteeringVector
    """A registered vector's name, or a vector given inline."""
    scale: float | None = None
    """None: the vector's stored setting, else 1."""
    layers: Sequence[int] | None = None
    """None: every layer the vector has values for (or its stored setting's, without a scale)."""
    positions: Positions | Sequence[int] | None = None
    """A position kind or absolute token positions (kept as a tuple); None: the stored setting's, else ``all``."""
    normalize: bool | None = None
    """None: the stored setting's, else off."""

    def __post_init__(self) -> None:
        if self.positions is not None and not isinstance(self.positions, str):
            self.positions = tuple(self.positions)

    @property
    def name(self) -> str | None:
        return self.vector if isinstance(self.vector, str) else self.vector.name

    def to_dict(self) -> dict[str, Any]:
        src: dict[str, Any] = ({"name": self.vector} if isinstance(self.vector, str)
                               else {"values": {str(k): v.tolist() for k, v in sorted(self.vector.values.items())}})
        return {**src, "scale": self.scale, "layers": None if self.layers is None else list(self.layers),
                "positions": self.positions if self.positions is None or isinstance(self.positions, str)
                else list(self.positions), "normalize": self.normalize}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SteeringApplication:
        vector: str | SteeringVector = data["name"] if data.get("name") is not None else \
            SteeringVector.from_lists({int(k): v for k, v in data["values"].items()})
        scale, normalize = data.get("scale"), data.get("normalize")
        return cls(vector, None if scale is None else float(scale), data.get("layers"), data.get("positions"),
                   None if normalize is None else bool(normalize))


@dataclass
class SteeringSpec:
    applications: list[SteeringApplication] = field(default_factory=list)

    @classmethod
    def single(cls, vector: str | SteeringVector, **kwargs: Any) -> SteeringSpec:
        return cls([SteeringApplication(vector=vector, **kwargs)])

    def to_dict(self) -> dict[str, Any]:
        return {"vectors": [a.to_dict() for a in self.applications]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SteeringSpec:
        return cls([SteeringApplication.from_dict(a) for a in data["vectors"]])


@dataclass(frozen=True)
class ResolvedApplication:
    """An application checked against the model: its vector's values for the layers it acts on (CPU)."""

    name: str | None
    values: Mapping[int, torch.Tensor]
    scale: float
    positions: Positions
    normalize: bool

    @property
    def layers(self) -> list[int]:
        return sorted(self.values)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale, "layers": self.layers,
                "positions": describe_positions(self.positions), "normalize": self.normalize}


@dataclass(frozen=True)
class ResolvedSteering:
    applications: tuple[ResolvedApplication, ...]

    @property
    def active(self) -> tuple[ResolvedApplication, ...]:
        """The applications that change anything (scale 0 is exactly unsteered)."""
        return tuple(a for a in self.applications if a.scale != 0)

    def describe(self) -> list[dict[str, Any]]:
        """What was applied, for responses and logs."""
        return [a.describe() for a in self.applications]


VectorLookup = Callable[[str], SteeringVector]


@dataclass(frozen=True)
class StoredSetting:
    """How a vector steers when a request names it without a scale (chosen by a sweep)."""

    scales: Mapping[int, float]
    """Absolute scale per layer."""
    positions: Positions
    normalize: bool

    @property
    def layers(self) -> list[int]:
        return sorted(self.scales)


def stored_setting(vector: SteeringVector) -> StoredSetting | None:
    """The vector's ``setting`` metadata (written by a build's or a sweep's choice), checked; None without one or
    when it does not fit the vector."""
    raw = vector.metadata.get("setting")
    if not isinstance(raw, Mapping):
        return None
    try:
        scales = {int(k): float(v) for k, v in dict(raw["scales_abs"]).items()}
        positions = parse_positions(raw.get("positions", DEFAULT_POSITIONS))
        normalize = bool(raw.get("normalize", DEFAULT_NORMALIZE))
    except (KeyError, TypeError, ValueError, SteeringValidationError):
        return None
    if not scales or any(x not in vector.values or not math.isfinite(s) for x, s in scales.items()):
        return None
    return StoredSetting(scales, positions, normalize)


def resolve(spec: SteeringSpec, *, hidden_size: int, num_layers: int, max_len: int | None = None,
            lookup: VectorLookup | None = None, param: str = "steering.vectors") -> ResolvedSteering:
    """Check every application against the model (and look up named vectors) before anything runs.

    ``max_len``: the longest sequence the model runs; explicit positions beyond it could never act."""
    apps = spec.applications
    if not apps:
        raise SteeringValidationError("steering spec has no vectors", param=param)
    if len(apps) > MAX_APPLICATIONS:
        raise SteeringValidationError(f"at most {MAX_APPLICATIONS} steering vectors per request", param=param)
    out: list[ResolvedApplication] = []
    for i, app in enumerate(apps):
        where = f"{param}[{i}]"
        vec = app.vector
        if isinstance(vec, str):
            if lookup is None:
                raise SteeringValidationError(f"{where}: no vector store to find {vec!r} in; give the vector inline",
                                              param=f"{where}.name")
            try:
                vec = lookup(vec)
            except NotFoundError as exc:
                exc.param = f"{where}.name"
                raise
        try:
            vec.validate(hidden_size, num_layers)
        except SteeringValidationError as exc:
            raise SteeringValidationError(f"{where}: {exc.message}", param=f"{where}.{exc.param or 'values'}") \
                from None
        setting = stored_setting(vec) if app.scale is None else None
        if setting is not None:
            if app.layers is not None and sorted(app.layers) != setting.layers:
                raise SteeringValidationError(
                    f"{where}: without a scale, vector {app.name or 'inline'!r} steers with its stored setting, "
                    f"which acts at layers {setting.layers}; give a scale to steer other layers",
                    param=f"{where}.scale")
            pos = setting.positions if app.positions is None else parse_positions(app.positions,
                                                                                 f"{where}.positions")
            norm = setting.normalize if app.normalize is None else bool(app.normalize)
            out += [ResolvedApplication(vec.name if isinstance(app.vector, SteeringVector) else app.vector,
                                        {x: vec.values[x]}, s, pos, norm)
                    for x, s in sorted(setting.scales.items())]
            continue
        scale = DEFAULT_SCALE if app.scale is None else app.scale
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise SteeringValidationError(f"{where}.scale must be a finite number", param=f"{where}.scale")
        layers = sorted(app.layers) if app.layers is not None else vec.layers
        if not layers:
            raise SteeringValidationError(f"{where}.layers is empty", param=f"{where}.layers")
        if len(set(layers)) != len(layers):
            raise SteeringValidationError(f"{where}.layers has duplicates", param=f"{where}.layers")
        for layer in layers:
            if not isinstance(layer, int) or not 0 <= layer < num_layers:
                raise SteeringValidationError(
                    f"{where}: layer {layer} does not exist; the model has layers 0..{num_layers - 1}",
                    param=f"{where}.layers")
            if layer not in vec.values:
                raise SteeringValidationError(
                    f"{where}: the vector has no values for layer {layer}; it has layers {vec.layers}",
                    param=f"{where}.layers")
        positions = parse_positions(DEFAULT_POSITIONS if app.positions is None else app.positions,
                                    f"{where}.positions")
        if max_len is not None and not isinstance(positions, str) and positions[-1] >= max_len:
            raise SteeringValidationError(
                f"{where}.positions: position {positions[-1]} is beyond the longest sequence this model runs "
                f"({max_len} tokens)", param=f"{where}.positions")
        out.append(ResolvedApplication(vec.name if isinstance(app.vector, SteeringVector) else app.vector,
                                       {layer: vec.values[layer] for layer in layers}, float(scale),
                                       positions, DEFAULT_NORMALIZE if app.normalize is None
                                       else bool(app.normalize)))
    return ResolvedSteering(tuple(out))


def uses_images(applications: Sequence[ResolvedApplication]) -> bool:
    """Whether any application acts at ``image`` positions (bound per prompt by :func:`bind_images`)."""
    return any(a.positions == "image" for a in applications)


def bind_images(steering: ResolvedSteering, positions: Sequence[int],
                param: str = "steering.vectors") -> ResolvedSteering:
    """A request's steering with ``image`` positions replaced by the absolute positions of its prompt's image
    tokens; SteeringValidationError when it has none."""
    if not uses_images(steering.applications):
        return steering
    if not positions:
        i = next(i for i, a in enumerate(steering.applications) if a.positions == "image")
        raise SteeringValidationError("positions 'image' steer a prompt's image tokens, and this prompt has no "
                                      "image", param=f"{param}[{i}].positions")
    bound = tuple(sorted(positions))
    return ResolvedSteering(tuple(replace(a, positions=bound) if a.positions == "image" else a
                                  for a in steering.applications))
