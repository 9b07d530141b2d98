"""``/v1/evaluations``: evaluation jobs and the scorers they can use."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends

from server.deps import EvaluationsDep, require_key
from server.protocol.evaluation import EvaluationRequest, ScorerList
from server.protocol.vectors import JobInfo
from server.serving.evaluation import EvaluationService

router = APIRouter(prefix="/v1/evaluations", tags=["evaluation"], dependencies=[Depends(require_key)])


@router.post("", response_model=JobInfo, status_code=202)
async def evaluate(req: Annotated[EvaluationRequest, Body()], evaluations: EvaluationsDep) -> JobInfo:
    return evaluations.submit(req)


@router.get("/scorers", response_model=ScorerList)
async def scorers() -> ScorerList:
    return EvaluationService.scorers()
