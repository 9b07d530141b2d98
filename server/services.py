"""Service objects, one per endpoint family, built once at start-up. The HTTP routes stay thin.

``EngineClient`` is the one interface between HTTP and the engine: it turns wire-level steering into a core
spec, submits, streams deltas back on the caller's event loop, records metrics, and cancels the
generation when the caller goes away.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import torch

from server.errors import APIError, error_body, from_engine_error
from server.metrics import Metrics
from server.protocol import (
    AppliedSteering,
    AttributedToken,
    AttributionCost,
    AttributionMethodInfo,
    AttributionMethodList,
    AttributionRequest,
    AttributionResponse,
    RankedToken,
    TargetToken,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    ResponseMessage,
    SamplingFields,
    SteeringRequest,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
    BuilderInfo,
    EvalCondition,
    EvaluationRequest,
    ScorerInfo,
    ScorerList,
    SteerEvaluation,
    TruthfulQAEvaluation,
    BuilderList,
    JobError,
    JobInfo,
    JobList,
    SweepSpec,
    VectorBuildRequest,
    VectorInfo,
    VectorList,
    VectorRename,
    VectorSweepRequest,
    new_id,
)
from server.settings import ServerSettings
from steering import attribution as attr
from steering import builders
from steering import evaluation as ev
from steering.datasets import PreferenceExample, TruthfulQAItem
from steering.gguf_vectors import export_controlvector
from steering.jobs import JobCancelledError, JobHandle
from steering.engine import Engine, GenerationRequest, RequestHandle, RequestOutput
from steering.errors import EngineError, RequestValidationError
from steering.loading import LoadedModel
from steering.prompts import encode_chat, encode_text
from steering.registry import VectorRegistry, check_name
from steering.sampling import SamplingParams, TokenLogprob
from steering.spec import SteeringApplication, SteeringSpec
from steering.vectors import SteeringVector


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


@dataclass
class Submitted:
    handles: list[RequestHandle]
    steering: SteeringSpec | None
    prompt_len: int


class EngineClient:
    """Submits requests to the engine from the asyncio loop and accounts for them in the metrics."""

    def __init__(self, lm: LoadedModel, engine: Engine, registry: VectorRegistry, metrics: Metrics,
                 settings: ServerSettings) -> None:
        self.lm, self.engine, self.registry, self.metrics, self.settings = lm, engine, registry, metrics, settings
        self.build_limits = builders.BuildLimits(max_examples=settings.build_max_examples,
                                                 max_sweep_rows=settings.build_max_sweep_rows)

    def steering_spec(self, req: SteeringRequest | None) -> SteeringSpec | None:
        if req is None:
            return None
        apps = []
        for ref in req.vectors:
            if ref.name is not None:
                vec = self.registry.get(ref.name)
            else:
                vec = SteeringVector({int(k): torch.tensor(v, dtype=torch.float32) for k, v in ref.values.items()},
                                     name=None)
            apps.append(SteeringApplication(
                vector=vec, scale=ref.scale, layers=ref.layers,
                positions=ref.positions if isinstance(ref.positions, str) else tuple(ref.positions),
                normalize=ref.normalize,
            ))
        spec = SteeringSpec(apps)
        try:
            spec.validate(self.lm.hidden_size, self.lm.num_layers)
        except EngineError as exc:
            raise APIError(400, exc.message, exc.param or "steering") from exc
        return spec

    def submit(self, prompt_ids: list[int], sampling: Sequence[SamplingParams],
               steering: SteeringSpec | None) -> Submitted:
        loop = asyncio.get_running_loop()
        handles: list[RequestHandle] = []
        try:
            for sp in sampling:
                handles.append(self.engine.submit(GenerationRequest(prompt_ids, sp, steering), loop=loop))
        except EngineError as exc:
            for h in handles:
                h.cancel()
            api = from_engine_error(exc, self.settings.retry_after_seconds)
            self.metrics.rejected("queue_full" if api.status == 503 else "invalid_request")
            raise api from exc
        if steering is not None:
            for app in steering.applications:
                self.metrics.steered.labels(self.metrics.model_name, app.vector.name or "inline").inc(len(handles))
        return Submitted(handles, steering, len(prompt_ids))

    async def stream(self, handle: RequestHandle) -> AsyncIterator[RequestOutput]:
        """Deltas of one request; if the consumer stops early, the generation is cancelled."""
        last_time = None
        generated = 0
        finished = False
        try:
            async for out in handle:
                generated = out.num_generated_tokens
                if out.token_ids:
                    if last_time is not None:
                        self.metrics.itl.labels(self.metrics.model_name).observe(out.time - last_time)
                    last_time = out.time
                if out.finished:
                    finished = True
                    self.metrics.finished(out.finish_reason, out.num_prompt_tokens, generated, out.metrics)
                yield out
        finally:
            if not finished:
                handle.cancel()
                self.metrics.finished("abort", len(handle.request.prompt_token_ids), generated, handle.metrics)


def _usage(sub: Submitted, completion: int) -> Usage:
    return Usage(prompt_tokens=sub.prompt_len, completion_tokens=completion,
                 total_tokens=sub.prompt_len + completion)


def sampling_params(req: SamplingFields, max_tokens: int | None, default_max: int, logprobs: bool,
                    top_logprobs: int) -> list[SamplingParams]:
    base = dict(
        max_tokens=max_tokens if max_tokens is not None else default_max,
        min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None else req.top_k,
        stop=req.stop_list(), stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
        logprobs=logprobs, top_logprobs=top_logprobs,
    )
    out = []
    for i in range(req.n):
        seed = None if req.seed is None else (req.seed + i) % 2**63
        out.append(SamplingParams(seed=seed, **base))
    return out


class GenerationService:
    """/v1/chat/completions and /v1/completions, streaming or not."""

    def __init__(self, client: EngineClient, model_name: str) -> None:
        self.client = client
        self.lm = client.lm
        self.model_name = model_name

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                           "model", "not_found_error")

    def _remaining(self, prompt_len: int) -> int:
        remaining = self.client.engine.max_model_len - prompt_len
        if remaining < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model's maximum context length is "
                                f"{self.client.engine.max_model_len}", "messages")
        return remaining

    def _applied(self, spec: SteeringSpec | None) -> list[AppliedSteering] | None:
        return [AppliedSteering(**d) for d in spec.describe()] if spec else None

    def _token_str(self, tok: int) -> str:
        return self.lm.tokenizer.decode([tok])

    def _chat_logprobs(self, lps: list[TokenLogprob]) -> ChoiceLogprobs:
        entries = []
        for lp in lps:
            s = self._token_str(lp.token_id)
            entries.append(TokenLogprobEntry(
                token=s, logprob=lp.logprob, bytes=list(s.encode()),
                top_logprobs=[TopLogprob(token=(t := self._token_str(i)), logprob=v, bytes=list(t.encode()))
                              for i, v in lp.top],
            ))
        return ChoiceLogprobs(content=entries)

    def _completion_logprobs(self, lps: list[TokenLogprob], offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for lp in lps:
            s = self._token_str(lp.token_id)
            out.tokens.append(s)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self._token_str(i): v for i, v in lp.top})
            out.text_offset.append(offset)
            offset += len(s)
        return out

    # -- chat ----------------------------------------------------------------------------------------------
    def prepare_chat(self, req: ChatCompletionRequest) -> Submitted:
        self.check_model(req.model)
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                    for m in req.messages]
        try:
            ids = encode_chat(self.lm.tokenizer, messages)
        except RequestValidationError as exc:
            raise APIError(400, exc.message, exc.param) from exc
        spec = self.client.steering_spec(req.steering)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        sps = sampling_params(req, max_tokens, self._remaining(len(ids)), req.logprobs, req.top_logprobs or 0)
        return self.client.submit(ids, sps, spec)

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        sub = self.prepare_chat(req)
        results = await self._collect(sub)
        choices = []
        completion = 0
        for i, outs in enumerate(results):
            last = outs[-1]
            completion += last.num_generated_tokens
            lps = [lp for o in outs for lp in o.logprobs]
            choices.append(ChatChoice(
                index=i, message=ResponseMessage(content="".join(o.text for o in outs)),
                logprobs=self._chat_logprobs(lps) if req.logprobs else None,
                finish_reason=last.finish_reason, stop_reason=last.stop_reason,
            ))
        return ChatCompletionResponse(
            id=new_id("chatcmpl"), model=self.model_name, choices=choices,
            usage=_usage(sub, completion), steering=self._applied(sub.steering),
        )

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[str]:
        sub = self.prepare_chat(req)  # errors here become a normal 4xx/503 response
        return self._chat_events(req, sub)

    async def _chat_events(self, req: ChatCompletionRequest, sub: Submitted) -> AsyncIterator[str]:
        rid, created = new_id("chatcmpl"), int(time.time())
        applied = self._applied(sub.steering)
        base = dict(id=rid, created=created, model=self.model_name)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        for i in range(len(sub.handles)):
            first = ChatCompletionChunk(**base, choices=[ChatChunkChoice(index=i, delta=DeltaMessage(
                role="assistant", content=""))], steering=applied if i == 0 else None)
            yield sse(first.model_dump(exclude_none=True))
        completion = 0
        async for i, out in self._merge(sub):
            if out.error is not None and out.finish_reason == "error":
                yield sse(error_body(500, str(out.error), type_="server_error"))
                break
            if not out.text and not out.finished and not (req.logprobs and out.logprobs):
                continue
            if out.finished:
                completion += out.num_generated_tokens
            choice = ChatChunkChoice(
                index=i, delta=DeltaMessage(content=out.text or None),
                logprobs=self._chat_logprobs(out.logprobs) if req.logprobs and out.logprobs else None,
                finish_reason=out.finish_reason, stop_reason=out.stop_reason,
            )
            chunk = ChatCompletionChunk(**base, choices=[choice]).model_dump(exclude_none=True)
            if out.finished:
                chunk["choices"][0]["finish_reason"] = out.finish_reason
            yield sse(chunk)
        else:
            if include_usage:
                yield sse(ChatCompletionChunk(**base, choices=[], usage=_usage(sub, completion)).model_dump(
                    exclude_none=True) | {"choices": []})
        yield sse("[DONE]")

    # -- completions ---------------------------------------------------------------------------------------
    def prepare_completion(self, req: CompletionRequest) -> Submitted:
        self.check_model(req.model)
        ids = encode_text(self.lm.tokenizer, req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        spec = self.client.steering_spec(req.steering)
        max_tokens = req.max_tokens if req.max_tokens is not None else min(16, self._remaining(len(ids)))
        n_lp = req.logprobs if req.logprobs is not None else 0
        sps = sampling_params(req, max_tokens, 16, req.logprobs is not None, n_lp)
        return self.client.submit(ids, sps, spec)

    async def complete(self, req: CompletionRequest) -> CompletionResponse:
        sub = self.prepare_completion(req)
        results = await self._collect(sub)
        choices, completion = [], 0
        for i, outs in enumerate(results):
            last = outs[-1]
            completion += last.num_generated_tokens
            lps = [lp for o in outs for lp in o.logprobs]
            choices.append(CompletionChoice(
                index=i, text="".join(o.text for o in outs),
                logprobs=self._completion_logprobs(lps, 0) if req.logprobs is not None else None,
                finish_reason=last.finish_reason, stop_reason=last.stop_reason,
            ))
        return CompletionResponse(
            id=new_id("cmpl"), model=self.model_name, choices=choices,
            usage=_usage(sub, completion), steering=self._applied(sub.steering),
        )

    async def complete_stream(self, req: CompletionRequest) -> AsyncIterator[str]:
        sub = self.prepare_completion(req)
        return self._completion_events(req, sub)

    async def _completion_events(self, req: CompletionRequest, sub: Submitted) -> AsyncIterator[str]:
        rid, created = new_id("cmpl"), int(time.time())
        applied = self._applied(sub.steering)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        completion, offsets, sent_steering = 0, [0] * len(sub.handles), False
        async for i, out in self._merge(sub):
            if out.error is not None and out.finish_reason == "error":
                yield sse(error_body(500, str(out.error), type_="server_error"))
                break
            if not out.text and not out.finished and not (req.logprobs is not None and out.logprobs):
                continue
            if out.finished:
                completion += out.num_generated_tokens
            lp = None
            if req.logprobs is not None and out.logprobs:
                lp = self._completion_logprobs(out.logprobs, offsets[i])
            offsets[i] += len(out.text)
            chunk = CompletionResponse(id=rid, created=created, model=self.model_name, choices=[CompletionChoice(
                index=i, text=out.text, logprobs=lp, finish_reason=out.finish_reason, stop_reason=out.stop_reason)],
                steering=None if sent_steering else applied).model_dump(exclude_none=True)
            chunk["choices"][0]["finish_reason"] = out.finish_reason
            sent_steering = True
            yield sse(chunk)
        else:
            if include_usage:
                yield sse(CompletionResponse(id=rid, created=created, model=self.model_name, choices=[],
                                             usage=_usage(sub, completion)).model_dump(exclude_none=True))
        yield sse("[DONE]")

    # -- helpers -------------------------------------------------------------------------------------------
    async def _merge(self, sub: Submitted) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Interleave the deltas of the n choices as they come; cancel all on early exit."""
        streams = [self.client.stream(h) for h in sub.handles]
        if len(streams) == 1:
            try:
                async for out in streams[0]:
                    yield 0, out
            finally:
                await streams[0].aclose()
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream) -> None:
            try:
                async for out in stream:
                    await queue.put((i, out))
            finally:
                await stream.aclose()
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, out = await queue.get()
                if out is None:
                    remaining -= 1
                    continue
                yield i, out
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _collect(self, sub: Submitted) -> list[list[RequestOutput]]:
        results: list[list[RequestOutput]] = [[] for _ in sub.handles]
        async for i, out in self._merge(sub):
            results[i].append(out)
        for outs in results:
            last = outs[-1]
            if last.finish_reason == "error":
                raise APIError(500, f"generation failed: {last.error}", type_="server_error")
        return results


class ModelService:
    def __init__(self, lm: LoadedModel, engine: Engine, model_name: str, created: int) -> None:
        self.card = ModelCard(id=model_name, created=created, max_model_len=engine.max_model_len,
                              num_layers=lm.num_layers, hidden_size=lm.hidden_size)

    def list(self) -> ModelList:
        return ModelList(data=[self.card])


class TokenizerService:
    def __init__(self, lm: LoadedModel, engine: Engine, generation: GenerationService) -> None:
        self.lm, self.engine, self.generation = lm, engine, generation

    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self.generation.check_model(req.model)
        tok = self.lm.tokenizer
        try:
            if req.prompt is not None:
                ids = list(tok(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"])
            else:
                ids = encode_chat(tok, [{"role": m.role, "content": m.text()} for m in req.messages],
                                  req.add_generation_prompt)
        except RequestValidationError as exc:
            raise APIError(400, exc.message, exc.param) from exc
        return TokenizeResponse(count=len(ids), max_model_len=self.engine.max_model_len, tokens=ids,
                                token_strs=tok.convert_ids_to_tokens(ids))

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.generation.check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < self.engine.vocab_size]
        if bad:
            raise APIError(400, f"token ids must be in [0, {self.engine.vocab_size}); got {bad[:5]}", "tokens")
        return DetokenizeResponse(prompt=self.lm.tokenizer.decode(req.tokens))


class JobService:
    """Background jobs (vector builds, sweeps): submitted to the engine, tracked here, polled by id.

    A job's result is post-processed on the event loop (a build saves its vector) before it reports
    ``succeeded``. Finished jobs are kept (the most recent ``keep`` of them) so clients can read them later."""

    def __init__(self, client: EngineClient, keep: int = 256) -> None:
        self.client = client
        self.keep = keep
        self._jobs: dict[str, _JobRecord] = {}

    def submit(self, type_: str, work, finish) -> JobInfo:
        """Run ``work`` as an engine job; ``finish(result) -> dict`` turns the core result into the job's JSON
        result (and may save it)."""
        engine = self.client.engine
        try:
            handle = engine.submit_job(work, type_, loop=asyncio.get_running_loop())
        except EngineError as exc:
            api = from_engine_error(exc, self.client.settings.retry_after_seconds)
            self.client.metrics.rejected("queue_full" if api.status == 503 else "invalid_request")
            raise api from exc
        return self.track(type_, handle, finish)

    def track(self, type_: str, handle: JobHandle, finish) -> JobInfo:
        """Track a job started elsewhere (a thread job, :func:`steering.jobs.start_thread_job`)."""
        rec = _JobRecord(handle, type_, time.time())
        self._jobs[handle.job_id] = rec
        rec.task = asyncio.ensure_future(self._finish(rec, finish))
        self._prune()
        return self.info(rec)

    async def _finish(self, rec: "_JobRecord", finish) -> None:
        try:
            result = await rec.handle.aresult()
            rec.result = finish(result)
            rec.status = "succeeded"
        except JobCancelledError:
            rec.status = "cancelled"
        except EngineError as exc:
            api = from_engine_error(exc)
            rec.status, rec.error = "failed", JobError(message=api.message, type=api.type, param=api.param)
        except Exception as exc:  # noqa: BLE001 - a failing job fails only itself
            rec.status, rec.error = "failed", JobError(message=str(exc), type="server_error")
        finally:
            rec.finished_at = time.time()
            self.client.metrics.job_done(rec.type, rec.status, rec.handle.metrics)

    def _prune(self) -> None:
        done = [k for k, r in self._jobs.items() if r.status not in ("queued", "running")]
        for k in done[: max(0, len(done) - self.keep)]:
            del self._jobs[k]

    def _get(self, job_id: str) -> "_JobRecord":
        rec = self._jobs.get(job_id)
        if rec is None:
            raise APIError(404, f"job {job_id!r} not found", "job_id")
        return rec

    def info(self, rec: "_JobRecord") -> JobInfo:
        h, m = rec.handle, rec.handle.metrics
        started = None if m.start_time is None else rec.created + (m.start_time - m.arrival_time)
        status = rec.status
        if status == "running" and m.start_time is None:
            status = "queued"
        progress = h.progress.overall()
        eta = None
        if status == "running" and progress and m.start_time is not None:
            elapsed = time.monotonic() - m.start_time
            eta = round(elapsed * (1 - progress) / progress, 1)
        if status == "running" and h.done():
            stage = "saving"
        else:
            stage = h.progress.stage or None
        if status == "succeeded":
            progress, eta = 1.0, 0.0
        return JobInfo(id=h.job_id, type=rec.type, status=status, stage=stage,
                       progress=None if progress is None else round(progress, 4), eta_seconds=eta,
                       created_at=int(rec.created), started_at=None if started is None else int(started),
                       finished_at=None if rec.finished_at is None else int(rec.finished_at),
                       compute_seconds=round(m.compute_seconds, 3), result=rec.result, error=rec.error)

    def get(self, job_id: str) -> JobInfo:
        return self.info(self._get(job_id))

    def list(self) -> JobList:
        return JobList(data=[self.info(r) for r in self._jobs.values()])

    def cancel(self, job_id: str) -> JobInfo:
        rec = self._get(job_id)
        rec.handle.cancel()
        return self.info(rec)


@dataclass
class _JobRecord:
    handle: JobHandle
    type: str
    created: float
    status: str = "running"
    result: dict | None = None
    error: JobError | None = None
    finished_at: float | None = None
    task: asyncio.Future | None = None


class VectorService:
    def __init__(self, client: EngineClient, registry: VectorRegistry, jobs: JobService) -> None:
        self.client, self.registry, self.jobs, self.lm = client, registry, jobs, client.lm

    @staticmethod
    def info(vec: SteeringVector) -> VectorInfo:
        return VectorInfo(name=vec.name or "", layers=vec.layers, hidden_size=vec.hidden_size,
                          norms={l: float(v.norm()) for l, v in sorted(vec.values.items())},
                          metadata=vec.metadata)

    def list(self) -> VectorList:
        return VectorList(data=[self.info(self.registry.get(n)) for n in self.registry.names()])

    def get(self, name: str) -> VectorInfo:
        return self.info(self.registry.get(name))

    def put(self, name: str, vec: SteeringVector, overwrite: bool, description: str | None) -> VectorInfo:
        if description:
            vec.metadata["description"] = description
        vec.metadata.setdefault("source", "upload")
        return self.info(self.registry.put(name, vec, overwrite=overwrite))

    def delete(self, name: str) -> None:
        self.registry.delete(name)

    def rename(self, name: str, req: VectorRename) -> VectorInfo:
        return self.info(self.registry.rename(name, req.new_name, req.overwrite))

    @staticmethod
    def methods() -> BuilderList:
        return BuilderList(data=[BuilderInfo(name=b.name, summary=b.summary, params=b.Params.model_json_schema())
                                 for b in (builders.BUILDERS[n] for n in builders.builder_names())])

    @staticmethod
    def _examples(items) -> list[PreferenceExample]:
        return [PreferenceExample(e.prompt, e.preferred, e.dispreferred) for e in items]

    @staticmethod
    def _sweep_config(spec: SweepSpec) -> builders.SweepConfig:
        return builders.SweepConfig(scales=list(spec.scales), layers=spec.layers, relative=spec.relative,
                                    normalize=spec.normalize, metric=spec.metric,
                                    positions=spec.positions if isinstance(spec.positions, str)
                                    else tuple(spec.positions))

    def build(self, req: VectorBuildRequest) -> JobInfo:
        check_name(req.name)
        if req.name in self.registry and not req.overwrite:
            raise APIError(409, f"steering vector {req.name!r} already exists (set overwrite to replace it)", "name")
        core = builders.BuildRequest(
            examples=self._examples(req.examples), method=req.method, params=req.params,
            validation=self._examples(req.validation) if req.validation else None,
            sweep=self._sweep_config(req.sweep) if req.sweep else None)
        prep = builders.prepare_build(self.lm, core, self.client.build_limits)

        def finish(result: builders.BuildResult) -> dict:
            vec = result.vector
            vec.metadata["source"] = "build"
            if req.description:
                vec.metadata["description"] = req.description
            saved = self.registry.put(req.name, vec, overwrite=req.overwrite)
            return {"vector": self.info(saved).model_dump(),
                    "sweep": result.sweep.as_dict() if result.sweep else None,
                    "seconds": round(result.seconds, 3)}

        return self.jobs.submit("vector_build", prep.work, finish)

    def sweep(self, name: str, req: VectorSweepRequest) -> JobInfo:
        vec = self.registry.get(name)
        cfg = self._sweep_config(req.sweep)
        data = builders.encode(self.lm, self._examples(req.examples), builders.encoding(vec, req.params))
        builders.check_sweep(self.lm, vec, cfg, len(data), self.client.build_limits)
        return self.jobs.submit("vector_sweep", lambda ctx: builders.sweep_work(ctx, vec, data, cfg),
                                lambda res: res.as_dict())

    def export_gguf(self, name: str, scale: float) -> tuple[bytes, list[int]]:
        """The vector as a llama.cpp control vector (layer 0, which llama.cpp cannot steer, is left out)."""
        import tempfile

        vec = self.registry.get(name)
        kept = {layer: v for layer, v in vec.values.items() if layer > 0}
        if not kept:
            raise APIError(400, "the vector has only layer 0, which llama.cpp control vectors cannot hold", "name")
        hint = (vec.metadata.get("model") or {}).get("model_type") or "llama"
        with tempfile.TemporaryDirectory() as d:
            path = f"{d}/{name}.gguf"
            export_controlvector(SteeringVector(kept, name=name), path, model_hint=hint, scale=scale)
            with open(path, "rb") as fh:
                return fh.read(), sorted(set(vec.values) - set(kept))


class EvaluationService:
    """``POST /v1/evaluations``: TruthfulQA (an engine job) or the steering effect on generation (a thread job that
    submits generations and a perplexity job to the engine). Both report through ``/v1/jobs/{id}``."""

    def __init__(self, client: EngineClient, jobs: JobService, settings: ServerSettings) -> None:
        self.client, self.jobs, self.settings, self.lm = client, jobs, settings, client.lm

    @staticmethod
    def scorers() -> ScorerList:
        return ScorerList(data=[ScorerInfo(name=c.name, summary=c.summary, higher=c.higher,
                                           params=c.Params.model_json_schema())
                                for c in (ev.SCORERS[n] for n in ev.scorer_names())])

    def _condition(self, i: int, cond: EvalCondition) -> ev.Condition:
        spec = self.client.steering_spec(cond.steering)
        label = cond.label or " + ".join(ev.label_for(a.vector.name, a.resolved_layers(), a.scale, cond.relative)
                                         for a in spec.applications)
        if cond.relative:
            apps = []
            for j, app in enumerate(spec.applications):
                where = f"conditions[{i}].steering.vectors[{j}]"
                if app.vector.name is None:
                    raise APIError(400, f"{where}: relative scales need a registered vector (its recorded "
                                        "hidden-state norms)", f"conditions[{i}].relative")
                try:
                    apps += ev.relative_applications(app.vector, app.scale, app.layers, app.positions, app.normalize,
                                                     param=f"conditions[{i}].relative")
                except EngineError as exc:
                    raise APIError(400, f"{where}: {exc.message}", exc.param) from exc
            spec = SteeringSpec(apps)
        return ev.Condition(label, spec)

    def submit(self, req: EvaluationRequest) -> JobInfo:
        conditions = [self._condition(i, c) for i, c in enumerate(req.conditions)]
        finish = self._finish
        if isinstance(req, TruthfulQAEvaluation):
            items = [TruthfulQAItem(q.question, q.best_answer, tuple(q.correct_answers), tuple(q.incorrect_answers))
                     for q in req.questions]
            fmt = ev.QAFormat(req.template, req.prompt_format, req.system_prompt, req.separator)
            prep = ev.prepare_truthfulqa(self.lm, ev.TruthfulQARequest(items, conditions, fmt, None, req.per_question),
                                         max_rows=self.settings.eval_max_scored_rows)
            return self.jobs.submit("evaluation_truthfulqa", prep.work, finish)
        assert isinstance(req, SteerEvaluation)
        core = ev.SteerEvalRequest(list(req.prompts), conditions, req.scorer, req.scorer_params, req.chat,
                                   req.system_prompt, req.max_tokens, req.temperature, req.top_p, req.seed, req.samples)
        prep = ev.prepare_steer(self.lm, core, max_prompts=self.settings.eval_max_prompts)
        handle = ev.start_steer(self.client.engine, prep, loop=asyncio.get_running_loop())
        return self.jobs.track("evaluation_steer", handle, finish)

    @staticmethod
    def _finish(report: ev.EvaluationReport) -> dict:
        return {"report": report.as_dict(), "markdown": report.markdown()}


class AttributionService:
    """/v1/attributions: runs as a chunked engine job, so generation keeps stepping while it computes."""

    def __init__(self, client: EngineClient, generation: GenerationService, settings: ServerSettings) -> None:
        self.client, self.generation, self.lm = client, generation, client.lm
        self.limits = attr.AttributionLimits(
            max_input_tokens=settings.attribution_max_input_tokens,
            max_target_tokens=settings.attribution_max_target_tokens,
            max_n_steps=settings.attribution_max_n_steps, max_probes=settings.attribution_max_probes,
            max_probe_steps=settings.attribution_max_probe_steps,
        )

    @staticmethod
    def methods() -> AttributionMethodList:
        return AttributionMethodList(data=[
            AttributionMethodInfo(name=m.name, summary=m.summary, gradient=m.gradient,
                                  params=m.Params.model_json_schema())
            for m in (attr.METHODS[n] for n in attr.method_names())
        ])

    def _prompt_ids(self, req: AttributionRequest) -> list[int]:
        tok = self.lm.tokenizer
        if req.prompt is not None:
            if not req.prompt:
                raise APIError(400, "the prompt is empty", "prompt")
            return list(tok(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"])
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                    for m in req.messages]
        return encode_chat(tok, messages)

    def _encode_target(self, text: str, param: str) -> list[int]:
        ids = list(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise APIError(400, f"'{param}' encodes to no tokens", param)
        return ids

    async def _generate_target(self, ids: list[int], max_tokens: int, spec) -> tuple[list[int], float]:
        t0 = time.monotonic()
        max_tokens = min(max_tokens, self.limits.max_target_tokens)
        sub = self.client.submit(ids, [SamplingParams(max_tokens=max_tokens, temperature=0.0)], spec)
        out: list[int] = []
        async for res in self.client.stream(sub.handles[0]):
            out.extend(res.token_ids)
            if res.finished and res.finish_reason == "error":
                raise APIError(500, f"generating the target failed: {res.error}", type_="server_error")
        if not out:
            raise APIError(400, "the model generated no token to attribute (it stopped at once); give a 'target'",
                           "target")
        return out, time.monotonic() - t0

    def _tokens(self, ids: list[int], lps: list[float]) -> list[TargetToken]:
        tok = self.lm.tokenizer
        return [TargetToken(id=i, text=tok.decode([i]), logprob=lp) for i, lp in zip(ids, lps)]

    async def attribute(self, req: AttributionRequest) -> AttributionResponse:
        self.generation.check_model(req.model)
        ids = self._prompt_ids(req)
        spec = self.client.steering_spec(req.steering)
        generated, gen_seconds = False, 0.0
        if req.contrast is not None:
            target = attr.AttributionTarget.contrastive(self._encode_target(req.contrast.preferred, "contrast"),
                                                        self._encode_target(req.contrast.dispreferred, "contrast"))
        else:
            if req.target is not None:
                cont = self._encode_target(req.target, "target")
            else:
                attr.prepare(self.lm, attr.AttributionRequest(ids, attr.AttributionTarget.continuation([0]),
                                                              req.method, req.params, req.reduction),
                             self.limits)  # reject a bad method or parameter before generating
                cont, gen_seconds = await self._generate_target(ids, req.max_tokens or 16, spec)
                generated = True
            target = (attr.AttributionTarget.per_token if req.per_token
                      else attr.AttributionTarget.continuation)(cont)
        core = attr.AttributionRequest(ids, target, req.method, req.params, req.reduction, spec)
        prep = attr.prepare(self.lm, core, self.limits, self.client.engine.max_model_len)
        engine = self.client.engine
        try:
            handle = engine.submit_job(prep.work, "attribution", loop=asyncio.get_running_loop())
        except EngineError as exc:
            api = from_engine_error(exc, self.client.settings.retry_after_seconds)
            self.client.metrics.rejected("queue_full" if api.status == 503 else "invalid_request")
            raise api from exc
        status = "error"
        try:
            result: attr.AttributionResult = await handle.aresult()
            status = "ok"
        finally:
            if not handle.done():
                handle.cancel()
                status = "abort"
            self.client.metrics.attribution_done(req.method, status, handle.metrics)
        return self._response(req, result, generated, gen_seconds, handle, spec)

    def _response(self, req: AttributionRequest, res: attr.AttributionResult, generated: bool,
                  gen_seconds: float, handle, spec: SteeringSpec | None) -> AttributionResponse:
        tok = self.lm.tokenizer
        texts = [tok.decode([i]) for i in res.prompt_ids]
        totals = res.totals.tolist()
        inputs = [AttributedToken(position=i, id=t, text=texts[i], special=res.special[i], score=totals[i])
                  for i, t in enumerate(res.prompt_ids)]
        ranked = lambda picks: [RankedToken(position=i, text=texts[i], score=s) for i, s in picks]  # noqa: E731
        conts = res.target.continuations
        m = handle.metrics
        cost = AttributionCost(
            **res.cost.as_dict(), seconds=round(res.seconds, 6), generation_seconds=round(gen_seconds, 6),
            queue_seconds=round((m.start_time or m.arrival_time) - m.arrival_time, 6),
        )
        body = dict(
            model=self.generation.model_name, method=res.method, params=res.params, reduction=res.reduction,
            target_type=res.target.kind, generated_target=generated, input_tokens=inputs,
            objective=res.objective, top_positive=ranked(res.top(req.top_k)),
            top_negative=ranked(res.top(req.top_k, negative=True)), info=res.info, cost=cost,
            steering=self.generation._applied(spec),
        )
        if res.target.kind == "contrastive":
            body["preferred"] = self._tokens(list(conts[0]), res.token_logprobs[0])
            body["dispreferred"] = self._tokens(list(conts[1]), res.token_logprobs[1])
        else:
            body["target"] = self._tokens(list(conts[0]), res.token_logprobs[0])
        if res.target.kind == "per_token":
            body["matrix"] = res.scores.tolist()
        return AttributionResponse(**body)
