"""The vector store: a directory of named steering vectors for one model, with atomic writes, reloaded at
start-up, every vector checked against the model on entry.

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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from steering.engine.types import ModelIdentity
from steering.errors import ConflictError, NotFoundError, SteeringValidationError
from steering.vectors import SteeringVector

log = logging.getLogger(__name__)

DEFAULT_VECTOR_DIR = Path.home() / ".local" / "share" / "steerserve" / "vectors"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""A whole name (matched with fullmatch, so no trailing newline slips through)."""
SUFFIX = ".safetensors"
STALE_TMP_SECONDS = 600
"""Temporary files of interrupted writes older than this are removed when the store loads."""


class VectorNotFoundError(NotFoundError):
    """No vector of that name is registered."""


class ModelMismatchError(SteeringValidationError):
    """The vector was built for a different model."""


class VectorExistsError(ConflictError):
    """A vector of that name already exists (and overwrite was not asked for)."""


RESERVED = frozenset({"build"})
"""Names that are paths of the vector API (``/v1/steering/vectors/build``), not vectors."""


def check_name(name: str) -> str:
    if isinstance(name, str) and name in RESERVED:
        raise SteeringValidationError(f"{name!r} is reserved (it is an endpoint); choose another name", param="name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise SteeringValidationError(
            "a vector name is 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit",
            param="name",
        )
    return name


class VectorStore:
    def __init__(self, root: str | os.PathLike, model: ModelIdentity | None) -> None:
        """``model`` None: no model is loaded (CLI housekeeping); vectors are then checked only for shape."""
        self.root = Path(root)
        self.model = model
        self._vectors: dict[str, SteeringVector] = {}
        self._norms: dict[str, dict[int, float]] = {}
        self._lock = threading.RLock()
        self.skipped: dict[str, str] = {}  # file name -> why it was not loaded
        self._listeners: list[Callable[[str], None]] = []

    def subscribe(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call ``listener(name)`` after a vector is stored, overwritten, deleted or renamed (with each name
        involved), e.g. for a backend that keeps copies of vectors; returns the unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _changed(self, *names: str) -> None:
        for listener in list(self._listeners):
            for name in names:
                try:
                    listener(name)
                except Exception:  # a listener must not undo a write that has happened
                    log.exception("vector store listener failed for %r", name)

    def _check(self, vec: SteeringVector) -> None:
        if self.model is None:
            vec.validate(vec.hidden_size if vec.values else 0, max(vec.values, default=0) + 1)
            return
        built_for = vec.metadata.get("model")
        if isinstance(built_for, dict):
            diff = self.model.mismatches(built_for)
            if diff:
                raise ModelMismatchError(
                    f"vector was built for another model: {', '.join(diff)}; build it again for "
                    f"{self.model.name!r} or remove its 'model' metadata if you know it fits", param="model")
        vec.validate(self.model.hidden_size, self.model.num_layers)

    def load_all(self) -> int:
        """(Re)load every vector file in the directory; return how many were loaded. Files that are symlinks
        out of the directory are refused; stale temporary files of interrupted writes are removed."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        root = self.root.resolve()
        loaded: dict[str, SteeringVector] = {}
        skipped: dict[str, str] = {}
        for path in sorted(self.root.glob(f"*{SUFFIX}")):
            name = path.name[: -len(SUFFIX)]
            try:
                check_name(name)
                if path.is_symlink() and not path.resolve().is_relative_to(root):
                    raise SteeringValidationError(f"{path.name} is a symlink out of the vector directory")
                vec = SteeringVector.load(path)
                vec.name = name
                self._check(vec)
                loaded[name] = vec
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the server
                skipped[path.name] = str(exc)
                log.warning("skipping steering vector %s: %s", path, exc)
        with self._lock:
            self._vectors = loaded
            self._norms = {n: _norms(v) for n, v in loaded.items()}
            self.skipped = skipped
        return len(loaded)

    def _remove_stale_temporaries(self) -> None:
        now = time.time()
        for tmp in self.root.glob(".*.tmp"):
            try:
                if tmp.is_file() and not tmp.is_symlink() and now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                    tmp.unlink()
                    log.info("removed %s, left by an interrupted write", tmp)
            except OSError as exc:  # another process may be finishing it, or it is gone already
                log.debug("could not remove %s: %s", tmp, exc)

    def norms(self, name: str) -> dict[int, float]:
        """Each layer's norm of a stored vector (computed once, when it was stored or loaded)."""
        with self._lock:
            self.get(name)
            return self._norms[name]

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
        """Store a copy of ``vector`` under ``name`` (with its creation time and model recorded); return it."""
        check_name(name)
        meta = dict(vector.metadata)
        meta.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        if self.model is not None:
            meta.setdefault("model", self.model.as_dict())
        vector = replace(vector, name=name, metadata=meta)
        self._check(vector)
        with self._lock:
            if name in self._vectors and not overwrite:
                raise VectorExistsError(f"steering vector {name!r} already exists", param="name")
            vector.save(self.root / f"{name}{SUFFIX}")
            self._vectors[name] = vector
            self._norms[name] = _norms(vector)
        self._changed(name)
        return vector

    def delete(self, name: str) -> None:
        with self._lock:
            if name not in self._vectors:
                raise VectorNotFoundError(f"steering vector {name!r} not found", param="name")
            (self.root / f"{name}{SUFFIX}").unlink(missing_ok=True)
            del self._vectors[name]
            self._norms.pop(name, None)
        self._changed(name)

    def rename(self, name: str, new_name: str, overwrite: bool = False) -> SteeringVector:
        """Rename atomically (one rename of the file); the vector keeps its values and metadata."""
        check_name(new_name)
        with self._lock:
            vec = self.get(name)
            if new_name == name:
                return vec
            if new_name in self._vectors and not overwrite:
                raise VectorExistsError(f"steering vector {new_name!r} already exists", param="new_name")
            os.replace(self.root / f"{name}{SUFFIX}", self.root / f"{new_name}{SUFFIX}")
            del self._vectors[name]
            vec = self._vectors[new_name] = replace(vec, name=new_name)
            self._norms[new_name] = self._norms.pop(name)
        self._changed(name, new_name)
        return vec


def _norms(vec: SteeringVector) -> dict[int, float]:
    return {layer: float(v.norm()) for layer, v in sorted(vec.values.items())}
