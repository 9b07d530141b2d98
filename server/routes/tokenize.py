"""``/tokenize`` and ``/detokenize`` (vLLM's extension endpoints)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.deps import ServicesDep, require_key
from server.protocol.models import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse

router = APIRouter(tags=["tokenizer"], dependencies=[Depends(require_key)])


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(req: TokenizeRequest, svc: ServicesDep) -> TokenizeResponse:
    return svc.tokenizer.tokenize(req)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(req: DetokenizeRequest, svc: ServicesDep) -> DetokenizeResponse:
    return svc.tokenizer.detokenize(req)
