"""The steering a request carries into vLLM: ``SamplingParams.extra_args["steerserve"]``.

The server resolves and checks a request's steering once (:func:`steering.spec.resolve`); :func:`encode` turns the
result into plain msgpack-able data that crosses vLLM's process boundaries. Every vector travels by *key*: the
backend registers it into the workers' vector bank first (like a LoRA adapter), so a request carries a few
bytes, not the vector::

    {"v": 1, "applications": [
        {"key": "truthful@3f2a...", "layers": [12, 13], "scale": 4.0,
         "positions": "all" | "prompt" | "generated" | [absolute token positions], "normalize": true}]}

:func:`parse` is the workers' side. It re-checks the shape, because a worker cannot fail one request cleanly:
an invalid spec is logged and counted (``invalid_specs`` in the workers' stats), and the request runs unsteered.
The server never sends one; the count is there to prove it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

KEY = "steerserve"
"""The ``extra_args`` entry that carries the steering."""
VERSION = 1
MODES = {"all": 0, "prompt": 1, "generated": 2}
EXPLICIT = 3


class SpecError(ValueError):
    """A malformed steering entry (only a client other than the server could send one)."""


@dataclass(frozen=True)
class WireApplication:
    key: str
    layers: tuple[int, ...]
    scale: float
    mode: int
    explicit: tuple[int, ...]
    normalize: bool


def vector_key(name: str | None, values: Mapping[int, torch.Tensor]) -> str:
    """The bank key of a vector's values on the layers it acts on: its name (``inline`` without one) and a
    digest of the values, so an overwritten vector never reuses the old one's rows."""
    h = hashlib.blake2b(digest_size=12)
    for layer in sorted(values):
        h.update(layer.to_bytes(4, "little"))
        h.update(values[layer].detach().to(torch.float32).contiguous().numpy().tobytes())
    return f"{name or 'inline'}@{h.hexdigest()}"


def layer_bytes(values: Mapping[int, torch.Tensor]) -> dict[int, bytes]:
    """Per-layer little-endian float32 bytes: what registration sends (msgpack carries bytes, not tensors)."""
    return {int(layer): v.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
            for layer, v in values.items()}


def encode(applications: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """``(key, ResolvedApplication)`` pairs (active ones only) -> the ``extra_args`` entry."""
    apps = []
    for key, app in applications:
        positions = app.positions if isinstance(app.positions, str) else list(app.positions)
        apps.append({"key": key, "layers": app.layers, "scale": float(app.scale), "positions": positions,
                     "normalize": bool(app.normalize)})
    return {"v": VERSION, "applications": apps}


def parse(raw: Any, *, num_layers: int, key_layers: Callable[[str], frozenset[int] | None],
          max_applications: int) -> list[WireApplication]:
    """Check one request's entry against the workers' bank; raise :class:`SpecError` with the reason."""
    if not isinstance(raw, dict) or raw.get("v") != VERSION:
        raise SpecError(f"steering must be an object with v={VERSION}")
    unknown = set(raw) - {"v", "applications"}
    if unknown:
        raise SpecError(f"unknown steering fields {sorted(unknown)}")
    apps = raw.get("applications")
    if not isinstance(apps, list) or not apps:
        raise SpecError("steering.applications must be a non-empty list")
    if len(apps) > max_applications:
        raise SpecError(f"at most {max_applications} applications per request")
    out = []
    for i, a in enumerate(apps):
        where = f"applications[{i}]"
        if not isinstance(a, dict) or set(a) != {"key", "layers", "scale", "positions", "normalize"}:
            raise SpecError(f"{where} must have exactly key, layers, scale, positions, normalize")
        key, layers, scale, pos, norm = a["key"], a["layers"], a["scale"], a["positions"], a["normalize"]
        have = key_layers(key) if isinstance(key, str) else None
        if have is None:
            raise SpecError(f"{where}: vector {key!r} is not registered")
        if (not isinstance(layers, list) or not layers or len(set(layers)) != len(layers)
                or any(type(x) is not int or not 0 <= x < num_layers or x not in have for x in layers)):
            raise SpecError(f"{where}.layers must be distinct layers the vector has")
        if type(scale) not in (int, float) or not math.isfinite(scale):
            raise SpecError(f"{where}.scale must be a finite number")
        if not isinstance(norm, bool):
            raise SpecError(f"{where}.normalize must be a boolean")
        explicit: tuple[int, ...] = ()
        if isinstance(pos, str):
            if pos not in MODES:
                raise SpecError(f"{where}.positions must be all, prompt, generated or a list")
            mode = MODES[pos]
        elif isinstance(pos, list) and pos and all(type(p) is int and p >= 0 for p in pos):
            mode, explicit = EXPLICIT, tuple(sorted(set(pos)))
        else:
            raise SpecError(f"{where}.positions must be a non-empty list of non-negative positions")
        out.append(WireApplication(key, tuple(sorted(layers)), float(scale), mode, explicit, norm))
    return out
