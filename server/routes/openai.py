"""The OpenAI-compatible generation endpoints and ``/v1/models``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from server.deps import GenerateKey, ReadKey, ServicesDep
from server.openapi import API_ERRORS, errors
from server.protocol.generation import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
)
from server.protocol.models import ModelList
from server.streaming import event_stream, until_disconnect

router = APIRouter(prefix="/v1", tags=["openai"], responses={**API_ERRORS, **errors(404, 500)})


@router.get("/models", response_model=ModelList)
async def list_models(svc: ServicesDep, _: ReadKey) -> ModelList:
    return svc.models.listing()


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(req: ChatCompletionRequest, request: Request, svc: ServicesDep, _: GenerateKey) -> Any:
    if req.stream:
        return event_stream(await svc.generation.stream_chat(req))
    return await until_disconnect(request, svc.generation.chat(req))


@router.post("/completions", response_model=CompletionResponse)
async def completions(req: CompletionRequest, request: Request, svc: ServicesDep, _: GenerateKey) -> Any:
    if req.stream:
        return event_stream(await svc.generation.stream_completion(req))
    return await until_disconnect(request, svc.generation.complete(req))
