"""A directory of named steering vectors for one model: atomic writes, reload at start-up, checked on entry.

Each vector is one ``<name>.safetensors`` file (tensors ``layer.<i>`` plus JSON metadata). Writes go to a
temporary file that is fsynced and renamed into place, so a killed process leaves either the previous file
or the new one, never a half-written one. Files that do not fit the loaded model are refused on upload
and skipped, with a logged reason, at start-up.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from steering.errors import EngineError, SteeringValidationError
from steering.vectors import SteeringVector

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SUFFIX = ".safetensors"


class VectorNotFoundError(EngineError, KeyError):
    """No vector of that name is registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class VectorExistsError(EngineError):
    """A vector of that name already exists (and overwrite was not asked for)."""


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    hidden_size: int
    num_layers: int


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SteeringValidationError(
            "a vector name is 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit",
            param="name",
        )
    return name


class VectorRegistry:
    def __init__(self, root: str | os.PathLike, model: ModelIdentity) -> None:
        self.root = Path(root)
        self.model = model
        self._vectors: dict[str, SteeringVector] = {}
        self._lock = threading.RLock()
        self.skipped: dict[str, str] = {}  # file name -> why it was not loaded

    def _check(self, vec: SteeringVector) -> None:
        vec.validate(self.model.hidden_size, self.model.num_layers)
        built_for = vec.metadata.get("model")
        if isinstance(built_for, dict):
            hs, nl = built_for.get("hidden_size"), built_for.get("num_layers")
            if (hs is not None and hs != self.model.hidden_size) or (nl is not None and nl != self.model.num_layers):
                raise SteeringValidationError(
                    f"vector was built for model {built_for.get('name')!r} (hidden size {hs}, {nl} layers); "
                    f"the loaded model {self.model.name!r} has hidden size {self.model.hidden_size} and "
                    f"{self.model.num_layers} layers"
                )

    def load_all(self) -> int:
        """(Re)load every vector file in the directory; return how many were loaded."""
        self.root.mkdir(parents=True, exist_ok=True)
        loaded: dict[str, SteeringVector] = {}
        skipped: dict[str, str] = {}
        for path in sorted(self.root.glob(f"*{SUFFIX}")):
            name = path.name[: -len(SUFFIX)]
            try:
                check_name(name)
                vec = SteeringVector.load(path)
                vec.name = name
                self._check(vec)
                loaded[name] = vec
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the server
                skipped[path.name] = str(exc)
                log.warning("skipping steering vector %s: %s", path, exc)
        with self._lock:
            self._vectors = loaded
            self.skipped = skipped
        return len(loaded)

    def __len__(self) -> int:
        return len(self._vectors)

    def __contains__(self, name: str) -> bool:
        return name in self._vectors

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._vectors)

    def get(self, name: str) -> SteeringVector:
        with self._lock:
            vec = self._vectors.get(name)
        if vec is None:
            raise VectorNotFoundError(f"steering vector {name!r} not found", param="name")
        return vec

    def put(self, name: str, vector: SteeringVector, overwrite: bool = False) -> SteeringVector:
        check_name(name)
        vector.name = name
        self._check(vector)
        vector.metadata.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        vector.metadata.setdefault("model", {"name": self.model.name, "hidden_size": self.model.hidden_size,
                                             "num_layers": self.model.num_layers})
        with self._lock:
            if name in self._vectors and not overwrite:
                raise VectorExistsError(f"steering vector {name!r} already exists", param="name")
            vector.save(self.root / f"{name}{SUFFIX}")
            self._vectors[name] = vector
        return vector

    def delete(self, name: str) -> None:
        with self._lock:
            if name not in self._vectors:
                raise VectorNotFoundError(f"steering vector {name!r} not found", param="name")
            (self.root / f"{name}{SUFFIX}").unlink(missing_ok=True)
            del self._vectors[name]
