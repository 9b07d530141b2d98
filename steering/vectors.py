"""Steering vectors: plain dataclasses holding one direction per layer, stored as safetensors."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from steering.errors import SteeringValidationError
from steering.files import atomic_write

_LAYER_PREFIX = "layer."
_META_KEY = "steerserve"


_DICT_KEYS = ("model", "hidden_norms", "raw_norms", "sweep", "dataset", "params", "stats", "info")
"""Metadata entries that steerserve reads back, each a JSON object when present."""


def _read_metadata(path: str | os.PathLike, text: str) -> dict[str, Any]:
    """The file's steerserve metadata, with the types steerserve relies on checked (a file is client input)."""
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise SteeringValidationError(f"{path}: its steerserve metadata is not JSON ({exc})", param="metadata") \
            from None
    if not isinstance(meta, dict):
        raise SteeringValidationError(f"{path}: its steerserve metadata must be a JSON object", param="metadata")
    if meta.get("name") is not None and not isinstance(meta["name"], str):
        raise SteeringValidationError(f"{path}: metadata 'name' must be a string", param="metadata")
    inner = meta.get("metadata")
    if inner is not None and not isinstance(inner, dict):
        raise SteeringValidationError(f"{path}: metadata 'metadata' must be a JSON object", param="metadata")
    for key in _DICT_KEYS:
        if inner and inner.get(key) is not None and not isinstance(inner[key], dict):
            raise SteeringValidationError(f"{path}: metadata {key!r} must be a JSON object", param="metadata")
    sweep = (inner or {}).get("sweep") or {}
    if sweep.get("best") is not None and not isinstance(sweep["best"], dict):
        raise SteeringValidationError(f"{path}: metadata 'sweep.best' must be a JSON object", param="metadata")
    norms = (inner or {}).get("hidden_norms") or {}
    if any(not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) for v in norms.values()):
        raise SteeringValidationError(f"{path}: metadata 'hidden_norms' must map layers to finite numbers",
                                      param="metadata")
    return meta


@dataclass
class SteeringVector:
    """A steering direction per decoder layer: ``values[layer]`` is a 1-D tensor of the hidden size."""

    values: dict[int, torch.Tensor]
    name: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted(self.values)

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.values.values())).shape[-1])

    def validate(self, hidden_size: int, num_layers: int) -> None:
        """Raise SteeringValidationError unless every layer exists and every value is finite, of the right size."""
        label = f"vector {self.name!r}" if self.name else "vector"
        if not self.values:
            raise SteeringValidationError(f"{label} has no layers")
        for layer, vec in self.values.items():
            if not isinstance(layer, int) or not 0 <= layer < num_layers:
                raise SteeringValidationError(
                    f"{label}: layer {layer} does not exist; the model has layers 0..{num_layers - 1}",
                    param="layers",
                )
            if vec.dim() != 1 or vec.shape[0] != hidden_size:
                raise SteeringValidationError(
                    f"{label}: layer {layer} has shape {tuple(vec.shape)}, expected ({hidden_size},) "
                    "(the model's hidden size)",
                    param="values",
                )
            if not bool(torch.isfinite(vec).all()):
                raise SteeringValidationError(f"{label}: layer {layer} contains NaN or Inf", param="values")

    # -- persistence -------------------------------------------------------------------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{_LAYER_PREFIX}{layer}": v.detach().to("cpu", torch.float32).contiguous()
                for layer, v in sorted(self.values.items())}

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a temporary file in the same directory, fsync, then rename."""
        from safetensors.torch import save_file

        meta = {_META_KEY: json.dumps({"name": self.name, "metadata": self.metadata})}
        tensors = self.to_tensors()
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> SteeringVector:
        from safetensors import safe_open

        values: dict[int, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as fh:
            meta = _read_metadata(path, (fh.metadata() or {}).get(_META_KEY, "{}"))
            for key in fh.keys():
                index = key[len(_LAYER_PREFIX):]
                if not key.startswith(_LAYER_PREFIX) or not index.isdigit():
                    raise SteeringValidationError(f"{path}: unexpected tensor {key!r}; expected 'layer.<index>'")
                values[int(index)] = fh.get_tensor(key).to(torch.float32)
        return cls(values=values, name=meta.get("name"), metadata=meta.get("metadata") or {})

    @classmethod
    def from_lists(cls, values: dict[int, list[float]], name: str | None = None) -> SteeringVector:
        out = {}
        for layer, vals in values.items():
            if any(not isinstance(x, (int, float)) or (isinstance(x, float) and not math.isfinite(x)) for x in vals):
                raise SteeringValidationError(f"layer {layer}: values must be finite numbers", param="values")
            out[int(layer)] = torch.tensor(vals, dtype=torch.float32)
        return cls(values=out, name=name)
