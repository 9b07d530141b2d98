"""A cache of per-row attribution scores, so that builds which differ only in what they do with the scores
(GrAInS's ``k``, ``mode``, ``aggregate``, candidates, replacement; a sweep of them) do not recompute the
integrated gradients.

A row's scores are keyed by everything they depend on: the model (its name, dtype, device and a sample of every
parameter's values), the row's segments (token ids, parents and images), the objective's weights and the attribution
settings (points, rule, baseline, resolved precision). Entries live in memory, bounded, least recently used first
out; with a ``directory`` also on disk, one small file each written atomically, so that a later process (a sweep
of builds from a script) reuses them. A damaged file is a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from steering.tasks.packing import Segment

_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_fingerprint(lm) -> str:
    """The model's identity and 64 evenly spaced values of every parameter: cheap, and different for a model
    whose weights differ (computed once per model object)."""
    fp = _fingerprints.get(lm.model)
    if fp is None:
        h = hashlib.sha256(f"{lm.name}|{lm.dtype}|{lm.device.type}".encode())
        with torch.no_grad():
            for name, p in lm.model.named_parameters():
                flat = p.detach().reshape(-1)
                m = min(64, flat.numel())
                idx = torch.arange(m, device=flat.device) * (flat.numel() - 1) // max(1, m - 1)
                h.update(f"{name}{tuple(p.shape)}".encode())
                h.update(flat[idx].to("cpu", torch.float64).numpy().tobytes())
        fp = h.hexdigest()
        _fingerprints[lm.model] = fp
    return fp


def row_key(fingerprint: str, row: Sequence[Segment], weights: Sequence[float], settings: dict[str, Any]) -> str:
    payload = json.dumps({"model": fingerprint, "segments": [[[int(t) for t in s.ids], s.parent] +
                                                             ([[[im.digest, list(im.positions)] for im in s.images]]
                                                              if s.images else []) for s in row],
                          "weights": [float(w) for w in weights], "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


class ScoreCache:
    """Scores by key: in memory up to ``max_bytes``, and in ``directory`` when one is given."""

    def __init__(self, max_bytes: int = 64 << 20, directory: str | os.PathLike | None = None) -> None:
        self.max_bytes = max_bytes
        self.directory = Path(directory) if directory else None
        self._mem: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}.pt"

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            t = self._mem.get(key)
            if t is not None:
                self._mem.move_to_end(key)
                self.hits += 1
                return t
        if self.directory is not None:
            path = self._path(key)
            loaded = None
            if path.is_file():
                try:
                    loaded = torch.load(path, weights_only=True)
                except Exception:  # noqa: BLE001 - a damaged or foreign file is a miss
                    loaded = None
            if isinstance(loaded, torch.Tensor) and loaded.dtype == torch.float32 and loaded.dim() == 1:
                self._remember(key, loaded)
                with self._lock:
                    self.hits += 1
                return loaded
        with self._lock:
            self.misses += 1
        return None

    def put(self, key: str, scores: torch.Tensor) -> None:
        scores = scores.detach().to("cpu", torch.float32).contiguous()
        self._remember(key, scores)
        if self.directory is not None:
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    torch.save(scores, fh)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def _remember(self, key: str, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        with self._lock:
            old = self._mem.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            self._mem[key] = t
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._mem) > 1:
                _, old = self._mem.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        """Forget what is in memory (files stay) and reset the counters."""
        with self._lock:
            self._mem.clear()
            self._bytes = 0
            self.hits = self.misses = 0


SCORES = ScoreCache()
"""The process's cache (memory only; a script may replace it with one that has a directory)."""
