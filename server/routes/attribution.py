"""``/v1/attributions``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from server.deps import AttributionsDep, GenerateKey, ReadKey
from server.openapi import API_ERRORS, errors
from server.protocol.attribution import AttributionMethodList, AttributionRequest, AttributionResponse
from server.serving.attribution import AttributionService
from server.streaming import until_disconnect

router = APIRouter(prefix="/v1/attributions", tags=["attribution"], responses={**API_ERRORS, **errors(404, 500)})


@router.get("/methods", response_model=AttributionMethodList)
async def attribution_methods(_: ReadKey) -> AttributionMethodList:
    return AttributionService.methods()


@router.post("", response_model=AttributionResponse)
async def attribute(req: AttributionRequest, request: Request, attributions: AttributionsDep,
                    _: GenerateKey) -> Any:
    return await until_disconnect(request, attributions.attribute(req))
