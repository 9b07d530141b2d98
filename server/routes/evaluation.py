"""``/v1/evaluations``: evaluation jobs and the scorers they can use."""

from __future__ import annotations

from fastapi import APIRouter

from server.deps import EvaluationsDep, GenerateKey, ReadKey
from server.openapi import API_ERRORS, errors
from server.protocol.evaluation import EvaluationBody, ScorerList
from server.protocol.vectors import JobInfo
from server.serving.evaluation import EvaluationService

router = APIRouter(prefix="/v1/evaluations", tags=["evaluation"], responses={**API_ERRORS, **errors(404)})


@router.post("", response_model=JobInfo, status_code=202)
async def evaluate(req: EvaluationBody, evaluations: EvaluationsDep, who: GenerateKey) -> JobInfo:
    return await evaluations.submit(req.root, who)


@router.get("/scorers", response_model=ScorerList)
async def scorers(_: ReadKey) -> ScorerList:
    return EvaluationService.scorers()
