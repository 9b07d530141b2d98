"""Where analysis jobs run (attribution, vector builds and sweeps, evaluations): they need gradients and
activations, which only the Hugging Face engine gives.

When the generation backend has the capability (``hf``), it runs them itself. Otherwise (``vllm``) a Hugging Face
engine on the same model runs beside it, loaded according to ``settings.analysis``: at start-up (``start``), on
the first analysis request (``lazy``: that request and those after it answer 503 with ``Retry-After`` until the
model has loaded), or never (``off``: the analysis endpoints answer 501).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from server.errors import APIError
from steering.engine.base import AnalysisBackend, GenerationBackend
from steering.errors import UnsupportedError

log = logging.getLogger(__name__)

Mode = Literal["self", "start", "lazy", "off"]


@dataclass
class AnalysisServices:
    backend: Any  # GenerationBackend and AnalysisBackend
    attributions: Any
    evaluations: Any


class AnalysisHost:
    def __init__(self, mode: Mode, build: Callable[[], Any] | None,
                 make_services: Callable[[Any], AnalysisServices], off_reason: str | None = None) -> None:
        """``build()`` loads the analysis backend (blocking); ``make_services(backend)`` wires the services to it.
        Mode ``self``: ``build()`` returns the generation backend, which is used as is and never stopped here;
        call :meth:`load` once the services it needs exist."""
        self.mode = mode
        self.off_reason = off_reason or ("analysis (attribution, vector builds and sweeps, evaluations) is off on "
                                         "this server (STEERSERVE_ANALYSIS=off)")
        self._build = build
        self._make = make_services
        self._services: AnalysisServices | None = None
        self._error: str | None = None
        self._loading: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def _install(self, backend: Any) -> None:
        if not (isinstance(backend, AnalysisBackend) and isinstance(backend, GenerationBackend)):
            raise TypeError(f"{type(backend).__name__} cannot run analysis jobs")
        self._services = self._make(backend)

    def load(self) -> None:
        """Load now, on this thread (``start`` mode, at start-up)."""
        if self._services is not None or self._build is None:
            return
        try:
            backend = self._build()
            with self._lock:
                if self._closed:
                    backend.shutdown()
                    return
                self._install(backend)
            log.info("the analysis backend is ready")
        except Exception as exc:  # noqa: BLE001 - reported to every analysis request
            log.exception("the analysis backend failed to load")
            self._error = str(exc)

    def peek(self) -> AnalysisServices | None:
        return self._services

    def get(self) -> AnalysisServices:
        """The analysis services; 501 when analysis is off, 503 while the analysis model loads."""
        if self._services is not None:
            return self._services
        if self.mode == "off":
            raise UnsupportedError(self.off_reason)
        if self._error is not None:
            raise APIError(503, f"the analysis model failed to load: {self._error}")
        with self._lock:
            if self._loading is None and not self._closed:
                self._loading = threading.Thread(target=self.load, name="steerserve-analysis-load", daemon=True)
                self._loading.start()
        raise APIError(503, "the analysis model is loading (it is loaded on first use); retry shortly",
                       headers={"Retry-After": "5"})

    def drain(self, timeout: float) -> bool:
        svc = self._services
        return True if svc is None or self.mode == "self" else svc.backend.drain(timeout)

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
        svc = self._services
        if svc is not None and self.mode != "self":
            svc.backend.shutdown()
