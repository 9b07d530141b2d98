"""``/v1/attributions``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from server.deps import AttributionsDep, require_key
from server.protocol.attribution import AttributionMethodList, AttributionRequest, AttributionResponse
from server.serving.attribution import AttributionService
from server.streaming import until_disconnect

router = APIRouter(prefix="/v1/attributions", tags=["attribution"], dependencies=[Depends(require_key)])


@router.get("/methods", response_model=AttributionMethodList)
async def attribution_methods() -> AttributionMethodList:
    return AttributionService.methods()


@router.post("", response_model=AttributionResponse)
async def attribute(req: AttributionRequest, request: Request, attributions: AttributionsDep) -> Any:
    return await until_disconnect(request, attributions.attribute(req))
