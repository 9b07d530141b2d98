"""``/tokenize``, ``/detokenize`` and ``/tokenizer_info`` (vLLM's extension endpoints)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from server.deps import ReadKey, ServicesDep
from server.openapi import API_ERRORS, errors
from server.protocol.models import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)

router = APIRouter(tags=["tokenizer"], responses={**API_ERRORS, **errors(404)})


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(req: TokenizeRequest, svc: ServicesDep, _: ReadKey) -> Response:
    return Response(await svc.tokenizer.tokenize(req), media_type="application/json")


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(req: DetokenizeRequest, svc: ServicesDep, _: ReadKey) -> DetokenizeResponse:
    return svc.tokenizer.detokenize(req)


@router.get("/tokenizer_info", response_model=TokenizerInfo)
async def tokenizer_info(svc: ServicesDep, _: ReadKey) -> TokenizerInfo:
    return svc.tokenizer.info()
