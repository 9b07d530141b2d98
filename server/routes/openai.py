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
from server.protocol.models import ModelCard, ModelList
from server.streaming import event_stream, until_disconnect

router = APIRouter(prefix="/v1", tags=["openai"], responses={**API_ERRORS, **errors(404, 500)})


@router.get("/models", response_model=ModelList)
async def list_models(svc: ServicesDep, _: ReadKey) -> ModelList:
    return svc.models.listing()


@router.get("/models/{model_id:path}", response_model=ModelCard)
async def retrieve_model(model_id: str, svc: ServicesDep, _: ReadKey) -> ModelCard:
    """The served model's card (the OpenAI SDK's ``models.retrieve``); another name is a 404."""
    svc.models.check(model_id)
    return svc.models.card


EVENT: dict[str, Any] = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a JSON chunk, an error envelope, or [DONE]"},
    "event": {"type": "string"}}}
STREAMS: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": EVENT}}, "description": "with stream: true, events"}}


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=STREAMS)
async def chat_completions(req: ChatCompletionRequest, request: Request, svc: ServicesDep, _: GenerateKey) -> Any:
    if req.stream:
        return event_stream(await svc.generation.stream_chat(req))
    return await until_disconnect(request, svc.generation.chat(req))


@router.post("/completions", response_model=CompletionResponse, responses=STREAMS)
async def completions(req: CompletionRequest, request: Request, svc: ServicesDep, _: GenerateKey) -> Any:
    if req.stream:
        return event_stream(await svc.generation.stream_completion(req))
    return await until_disconnect(request, svc.generation.complete(req))
