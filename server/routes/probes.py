"""Probes and metadata: ``/health`` (the process and its engine), ``/ready`` (the model has loaded and the server
is not draining), ``/version``, ``/metrics`` (Prometheus)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.auth import Role
from server.deps import StateDep, bearer, require
from steering import __version__

log = logging.getLogger(__name__)
router = APIRouter(tags=["probes"])


@router.get("/health")
async def health(state: StateDep) -> Any:
    if state.load_error:
        return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
    if state.services is None:
        return {"status": "loading"}
    if not state.services.backend.alive():
        return JSONResponse({"status": "error", "error": "engine thread is not running"}, status_code=503)
    return {"status": "ok"}


@router.get("/ready")
async def ready(state: StateDep) -> Any:
    if not state.ready:
        reason = "draining" if state.draining else (state.load_error or "loading")
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)
    assert state.services is not None
    return {"status": "ready", "model": state.services.models.name}


@router.get("/version")
async def version(state: StateDep) -> dict[str, str]:
    import torch
    import transformers

    out = {"version": __version__, "backend": state.settings.backend, "torch": torch.__version__,
           "transformers": transformers.__version__}
    if state.settings.backend == "vllm":
        import vllm

        out["vllm"] = vllm.__version__
    return out


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition"}})
async def metrics(state: StateDep, request: Request) -> Response:
    if state.settings.metrics_require_key:
        await require(Role.read)(state, await bearer(request))
    svc = state.services
    if svc is None:
        return Response(b"", media_type=CONTENT_TYPE_LATEST)
    try:  # telemetry the backend's workers measured since the last scrape (vLLM); a failure costs only that
        report = await asyncio.to_thread(svc.backend.pull_telemetry)
    except Exception:  # noqa: BLE001 - the scrape still answers
        log.warning("could not collect the steering telemetry", exc_info=True)
        report = None
    if report is not None:
        svc.metrics.telemetry_report(report)
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)
