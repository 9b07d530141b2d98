"""``/v1/attributions``: which prompt tokens drove an output. It runs as a chunked job, so generation keeps
stepping while it computes; without a target, the model's own greedy continuation (with the request's
steering) is generated first and explained."""

from __future__ import annotations

import time
from typing import Any

from server.metrics import Metrics
from server.protocol.attribution import (
    AttributedToken,
    AttributionCost,
    AttributionMethodInfo,
    AttributionMethodList,
    AttributionRequest,
    AttributionResponse,
    RankedToken,
    TargetToken,
)
from server.protocol.common import AppliedSteering
from server.protocol.generation import chat_messages
from server.serving.jobs import JobService
from server.serving.models import ModelService
from server.serving.submission import Submitter
from server.serving.threads import prepare, tokenize
from steering.engine.base import GenerationBackend
from steering.engine.handles import JobHandle
from steering.errors import InvalidRequestError, RequestFailedError
from steering.multimodal import PromptImage, load_message_images
from steering.sampling import SamplingParams
from steering.spec import SteeringSpec
from steering.tasks import attribution as attr


class AttributionService:
    def __init__(self, backend: GenerationBackend, submitter: Submitter, jobs: JobService, models: ModelService,
                 metrics: Metrics, limits: attr.AttributionLimits) -> None:
        self.backend = backend
        self.inputs = backend.inputs
        self.submitter = submitter
        self.jobs = jobs
        self.models = models
        self.metrics = metrics
        self.limits = limits

    @staticmethod
    def methods() -> AttributionMethodList:
        return AttributionMethodList(data=[
            AttributionMethodInfo(name=m.name, summary=m.summary, gradient=m.gradient,
                                  params=m.Params.model_json_schema())
            for m in attr.METHODS
        ])

    def _prompt(self, req: AttributionRequest) -> tuple[list[int], tuple[PromptImage, ...]]:
        if req.prompt is not None:
            if not req.prompt:
                raise InvalidRequestError("the prompt is empty", param="prompt")
            return self.inputs.encode_text(req.prompt, add_special_tokens=req.add_special_tokens), ()
        messages = load_message_images(chat_messages(req.messages or []), self.backend.limits.images)
        return self.inputs.encode_chat_prompt(messages)

    def _encode_target(self, text: str, param: str) -> list[int]:
        ids = self.inputs.encode_continuation(text)
        if not ids:
            raise InvalidRequestError(f"'{param}' encodes to no tokens", param=param)
        return ids

    async def _generate_target(self, ids: list[int], max_tokens: int, spec: SteeringSpec | None,
                               images: tuple[PromptImage, ...] = ()) -> tuple[list[int], float]:
        t0 = time.monotonic()
        sampling = SamplingParams(max_tokens=min(max_tokens, self.limits.max_target_tokens), temperature=0.0)
        sub = self.submitter.submit(ids, [sampling], spec, images=images)
        out: list[int] = []
        async for res in self.submitter.stream(sub.handles[0]):
            out.extend(res.token_ids)
            if res.finished and res.finish_reason == "error":
                raise RequestFailedError(f"generating the target failed: {res.error}")
        if not out:
            raise InvalidRequestError("the model generated no token to attribute (it stopped at once); give a "
                                      "'target'", param="target")
        return out, time.monotonic() - t0

    async def attribute(self, req: AttributionRequest) -> AttributionResponse:
        self.models.check(req.model)
        texts = [req.prompt] if req.prompt is not None else [m.text() for m in req.messages or []]
        self.backend.limits.check_text(texts, "prompt" if req.prompt is not None else "messages")
        ids, images = await tokenize(self._prompt, req)
        spec = req.steering.to_core() if req.steering is not None else None
        generated, gen_seconds = False, 0.0
        if req.contrast is not None:
            target = attr.AttributionTarget.contrastive(self._encode_target(req.contrast.preferred, "contrast"),
                                                        self._encode_target(req.contrast.dispreferred, "contrast"))
        else:
            if req.target is not None:
                cont = self._encode_target(req.target, "target")
            else:
                attr.check_method(req.method, req.params, req.reduction, self.limits)  # before generating
                cont, gen_seconds = await self._generate_target(ids, req.max_tokens or 16, spec, images)
                generated = True
            target = (attr.AttributionTarget.per_token if req.per_token
                      else attr.AttributionTarget.continuation)(cont)
        core = attr.AttributionRequest(ids, target, req.method, req.params, req.reduction, spec, images)
        prep = await prepare(attr.prepare, self.backend, core, self.limits)
        handle = self.jobs.start("attribution", prep.work)
        status = "error"
        try:
            result: attr.AttributionResult = await handle.aresult()
            status = "ok"
        finally:
            if not handle.done():
                handle.cancel()
                status = "abort"
            self.metrics.attribution_done(req.method, status, handle.metrics)
        return self._response(req, result, generated, gen_seconds, handle, prep)

    def _tokens(self, ids: list[int], lps: list[float]) -> list[TargetToken]:
        return [TargetToken(id=i, text=self.inputs.token_text(i), logprob=lp) for i, lp in zip(ids, lps, strict=True)]

    def _response(self, req: AttributionRequest, res: attr.AttributionResult, generated: bool, gen_seconds: float,
                  handle: JobHandle[attr.AttributionResult], prep: attr.PreparedAttribution) -> AttributionResponse:
        texts = [self.inputs.token_text(i) for i in res.prompt_ids]
        totals = res.totals.tolist()
        inputs = [AttributedToken(position=i, id=t, text=texts[i], special=res.special[i], score=totals[i])
                  for i, t in enumerate(res.prompt_ids)]

        def ranked(picks: list[tuple[int, float]]) -> list[RankedToken]:
            return [RankedToken(position=i, text=texts[i], score=s) for i, s in picks]

        conts = res.target.continuations
        m = handle.metrics
        cost = AttributionCost(
            **res.cost.as_dict(), seconds=round(res.seconds, 6), generation_seconds=round(gen_seconds, 6),
            queue_seconds=round((m.start_time or m.arrival_time) - m.arrival_time, 6),
        )
        applied = None if prep.steering is None else [AppliedSteering(**d) for d in prep.steering.describe()]
        body: dict[str, Any] = dict(
            model=self.models.name, method=res.method, params=res.params, reduction=res.reduction,
            target_type=res.target.kind, generated_target=generated, input_tokens=inputs,
            images=res.image_grids(),
            objective=res.objective, top_positive=ranked(res.top(req.top_k)),
            top_negative=ranked(res.top(req.top_k, negative=True)), info=res.info, cost=cost, steering=applied,
        )
        if res.target.kind == "contrastive":
            body["preferred"] = self._tokens(list(conts[0]), res.token_logprobs[0])
            body["dispreferred"] = self._tokens(list(conts[1]), res.token_logprobs[1])
        else:
            body["target"] = self._tokens(list(conts[0]), res.token_logprobs[0])
        if res.target.kind == "per_token":
            body["matrix"] = res.scores.tolist()
        return AttributionResponse(**body)
