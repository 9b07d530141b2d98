"""``POST /v1/evaluations``: TruthfulQA (a job: scoring only) or the steering effect on generation (a thread job
that submits generations and a perplexity job to the backend). Both report through ``/v1/jobs/{id}``."""

from __future__ import annotations

import asyncio
from typing import Any

from server.auth import Principal
from server.protocol.evaluation import EvaluationRequest, ScorerInfo, ScorerList, TruthfulQAEvaluation
from server.protocol.vectors import JobInfo
from server.serving.jobs import JobService
from server.serving.threads import prepare
from steering.engine.base import GenerationBackend
from steering.store import VectorStore
from steering.tasks import evaluation as ev


def _report(report: ev.EvaluationReport) -> dict[str, Any]:
    return {"report": report.as_dict(), "markdown": report.markdown()}


class EvaluationService:
    def __init__(self, backend: GenerationBackend, store: VectorStore, jobs: JobService, max_prompts: int,
                 max_scored_rows: int) -> None:
        self.backend = backend
        self.store = store
        self.jobs = jobs
        self.max_prompts = max_prompts
        self.max_scored_rows = max_scored_rows

    @staticmethod
    def scorers() -> ScorerList:
        return ScorerList(data=[ScorerInfo(name=c.name, summary=c.summary, higher=c.higher,
                                           params=c.Params.model_json_schema()) for c in ev.SCORERS])

    async def submit(self, req: EvaluationRequest, owner: Principal) -> JobInfo:
        if isinstance(req, TruthfulQAEvaluation):
            prep = await prepare(ev.prepare_truthfulqa, self.backend, req.to_core(self.store.get),
                                 max_rows=self.max_scored_rows, images=self.backend.limits.images)
            return self.jobs.submit("evaluation_truthfulqa", prep.work, _report, owner)
        steer = await prepare(ev.prepare_steer, self.backend, req.to_core(self.store.get),
                              max_prompts=self.max_prompts)
        handle = ev.start_steer(self.backend, steer, loop=asyncio.get_running_loop())
        return self.jobs.track("evaluation_steer", handle, _report, owner)
