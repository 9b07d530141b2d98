"""``/v1/chat/completions`` and ``/v1/completions``, whole or streamed.

Preparing a request (encoding the prompt, translating sampling and steering, submitting every choice) happens
before any byte of the response, so its errors answer as plain 4xx/503; a failure after a stream started
becomes an error event and ``[DONE]``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from server.protocol.common import Usage, new_id
from server.protocol.generation import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ResponseMessage,
    chat_messages,
)
from server.serving.logprobs import chat_logprobs, completion_logprobs
from server.serving.models import ModelService
from server.serving.submission import Submitted, Submitter
from server.serving.threads import tokenize
from server.streaming import DONE, error_event, sse
from steering.errors import InvalidRequestError

DEFAULT_COMPLETION_TOKENS = 16


def _usage(sub: Submitted, completion: int) -> Usage:
    return Usage(prompt_tokens=sub.prompt_len, completion_tokens=completion, total_tokens=sub.prompt_len + completion)


class GenerationService:
    def __init__(self, submitter: Submitter, models: ModelService) -> None:
        self.submitter = submitter
        self.models = models
        self.inputs = submitter.backend.inputs
        self.limits = submitter.backend.limits

    def _remaining(self, prompt_len: int, param: str) -> int:
        limit = self.models.max_model_len
        if limit - prompt_len < 1:
            raise InvalidRequestError(f"the prompt has {prompt_len} tokens; this model's maximum context length is "
                                      f"{limit}", param=param)
        return limit - prompt_len

    # -- chat ----------------------------------------------------------------------------------------------------
    async def prepare_chat(self, req: ChatCompletionRequest) -> Submitted:
        self.models.check(req.model)
        messages = chat_messages(req.messages)
        self.limits.check_text([m["content"] for m in messages], "messages")
        ids = await tokenize(self.inputs.encode_chat, messages)
        remaining = self._remaining(len(ids), "messages")
        max_tokens = req.requested_max_tokens()
        sampling = req.to_sampling(max_tokens if max_tokens is not None else remaining, req.logprobs,
                                   req.top_logprobs or 0)
        return self.submitter.submit(ids, sampling, req.steering_spec())

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        sub = await self.prepare_chat(req)
        results = await self.submitter.collect(sub)
        choices, completion = [], 0
        for i, outs in enumerate(results):
            last = outs[-1]
            completion += last.num_generated_tokens
            lps = [lp for o in outs for lp in o.logprobs]
            choices.append(ChatChoice(
                index=i, message=ResponseMessage(content="".join(o.text for o in outs)),
                logprobs=chat_logprobs(self.inputs, lps) if req.logprobs else None,
                finish_reason=last.finish_reason, stop_reason=last.stop_reason,
            ))
        return ChatCompletionResponse(id=new_id("chatcmpl"), model=self.models.name, choices=choices,
                                      usage=_usage(sub, completion), steering=sub.applied())

    async def stream_chat(self, req: ChatCompletionRequest) -> AsyncIterator[str]:
        """Submit now (errors raise here, before the response starts), then stream the events."""
        return self._chat_events(req, await self.prepare_chat(req))

    async def _chat_events(self, req: ChatCompletionRequest, sub: Submitted) -> AsyncIterator[str]:
        base = dict(id=new_id("chatcmpl"), created=int(time.time()), model=self.models.name)
        applied = sub.applied()
        for i in range(len(sub.handles)):
            first = ChatCompletionChunk(**base, choices=[ChatChunkChoice(index=i, delta=DeltaMessage(
                role="assistant", content=""))], steering=applied if i == 0 else None)
            yield sse(first.model_dump(exclude_none=True))
        completion = 0
        async for i, out in self.submitter.merge(sub):
            error = self.submitter.stop_error(out)
            if error is not None:
                yield error_event(error)
                break
            if not out.text and not out.finished and not (req.logprobs and out.logprobs):
                continue
            if out.finished:
                completion += out.num_generated_tokens
            choice = ChatChunkChoice(
                index=i, delta=DeltaMessage(content=out.text or None),
                logprobs=chat_logprobs(self.inputs, out.logprobs) if req.logprobs and out.logprobs else None,
                finish_reason=out.finish_reason, stop_reason=out.stop_reason,
            )
            chunk = ChatCompletionChunk(**base, choices=[choice]).model_dump(exclude_none=True)
            if out.finished:
                chunk["choices"][0]["finish_reason"] = out.finish_reason
            yield sse(chunk)
        else:
            if req.include_usage:
                usage = ChatCompletionChunk(**base, choices=[], usage=_usage(sub, completion))
                yield sse(usage.model_dump(exclude_none=True) | {"choices": []})
        yield DONE

    # -- completions ---------------------------------------------------------------------------------------------
    async def prepare_completion(self, req: CompletionRequest) -> Submitted:
        self.models.check(req.model)
        if isinstance(req.prompt, str):
            self.limits.check_text([req.prompt], "prompt")
            ids = await tokenize(self.inputs.encode_text, req.prompt)
        else:
            ids = list(req.prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        max_tokens = req.max_tokens if req.max_tokens is not None else \
            min(DEFAULT_COMPLETION_TOKENS, self._remaining(len(ids), "prompt"))
        sampling = req.to_sampling(max_tokens, req.logprobs is not None, req.logprobs or 0)
        return self.submitter.submit(ids, sampling, req.steering_spec())

    async def complete(self, req: CompletionRequest) -> CompletionResponse:
        sub = await self.prepare_completion(req)
        results = await self.submitter.collect(sub)
        choices, completion = [], 0
        for i, outs in enumerate(results):
            last = outs[-1]
            completion += last.num_generated_tokens
            lps = [lp for o in outs for lp in o.logprobs]
            choices.append(CompletionChoice(
                index=i, text="".join(o.text for o in outs),
                logprobs=completion_logprobs(self.inputs, lps, 0) if req.logprobs is not None else None,
                finish_reason=last.finish_reason, stop_reason=last.stop_reason,
            ))
        return CompletionResponse(id=new_id("cmpl"), model=self.models.name, choices=choices,
                                  usage=_usage(sub, completion), steering=sub.applied())

    async def stream_completion(self, req: CompletionRequest) -> AsyncIterator[str]:
        return self._completion_events(req, await self.prepare_completion(req))

    async def _completion_events(self, req: CompletionRequest, sub: Submitted) -> AsyncIterator[str]:
        base = dict(id=new_id("cmpl"), created=int(time.time()), model=self.models.name)
        applied = sub.applied()
        completion, offsets, sent_steering = 0, [0] * len(sub.handles), False
        async for i, out in self.submitter.merge(sub):
            error = self.submitter.stop_error(out)
            if error is not None:
                yield error_event(error)
                break
            if not out.text and not out.finished and not (req.logprobs is not None and out.logprobs):
                continue
            if out.finished:
                completion += out.num_generated_tokens
            lp = None
            if req.logprobs is not None and out.logprobs:
                lp = completion_logprobs(self.inputs, out.logprobs, offsets[i])
            offsets[i] += len(out.text)
            chunk = CompletionResponse(**base, choices=[CompletionChoice(
                index=i, text=out.text, logprobs=lp, finish_reason=out.finish_reason, stop_reason=out.stop_reason)],
                steering=None if sent_steering else applied).model_dump(exclude_none=True)
            chunk["choices"][0]["finish_reason"] = out.finish_reason
            sent_steering = True
            yield sse(chunk)
        else:
            if req.include_usage:
                yield sse(CompletionResponse(**base, choices=[], usage=_usage(sub, completion)).model_dump(
                    exclude_none=True))
        yield DONE
