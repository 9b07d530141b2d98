"""``/v1/chat/completions`` and ``/v1/completions``, whole or streamed.

Preparing a request (encoding the prompt, translating sampling and steering, submitting every choice) happens
before any byte of the response, so its errors answer as plain 4xx/503; a failure after a stream started
becomes an error event and ``[DONE]``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from server.protocol.common import Usage, new_id
from server.protocol.generation import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaFunction,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    GenerationFields,
    ResponseMessage,
    ToolCallOut,
    ToolMode,
    chat_messages,
)
from server.serving.logprobs import chat_logprobs, completion_logprobs, prompt_logprobs
from server.serving.models import ModelService
from server.serving.submission import Submitted, Submitter
from server.serving.threads import prepare, tokenize
from server.streaming import DONE, error_event, sse
from steering.engine.types import RequestOutput
from steering.errors import InvalidRequestError
from steering.multimodal import PromptImage, load_message_images, message_text
from steering.sampling import StructuredOutput
from steering.tools import ToolCall, ToolSpec, parse_auto, parse_required

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_TOKENS = 16


@dataclass
class ChatPlan:
    """How a chat request's output becomes a message: its tool mode and tools."""

    mode: ToolMode
    tools: list[ToolSpec] = field(default_factory=list)
    parallel: bool = True

    def message(self, text: str, finish_reason: str | None) -> tuple[ResponseMessage, str | None]:
        """The assistant message for ``text``, and the finish reason (``tool_calls`` when it called tools)."""
        calls: list[ToolCall] = []
        content: str | None = text
        if self.mode == "named":
            calls = [ToolCall(self.tools[0].name, text)] if finish_reason != "length" else []
            content = None if calls else text
        elif self.mode == "required" and finish_reason != "length":
            try:
                calls = parse_required(text, self.parallel)
            except (ValueError, KeyError, TypeError):
                calls = []
            if calls:
                content, finish_reason = None, "tool_calls"
        elif self.mode == "auto":
            content, calls = parse_auto(text, self.tools)
            if calls:
                finish_reason = "tool_calls"
        return ResponseMessage(content=content, tool_calls=[_call_out(c) for c in calls]), finish_reason


def _call_out(call: ToolCall) -> ToolCallOut:
    return ToolCallOut(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


def _usage(subs: list[Submitted], completion: int) -> Usage:
    prompt = sum(s.prompt_len for s in subs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _log_metadata(req: GenerationFields) -> None:
    if req.metadata:
        log.info("request metadata: %s", json.dumps(req.metadata, ensure_ascii=False))


class GenerationService:
    def __init__(self, submitter: Submitter, models: ModelService) -> None:
        self.submitter = submitter
        self.models = models
        self.inputs = submitter.backend.inputs
        self.limits = submitter.backend.limits

    def _remaining(self, prompt_len: int, param: str, generating: bool = True) -> int:
        limit = self.models.max_model_len
        if limit - prompt_len < (1 if generating else 0):
            raise InvalidRequestError(f"the prompt has {prompt_len} tokens; this model's maximum context length is "
                                      f"{limit}", param=param)
        return limit - prompt_len

    async def _compile(self, spec: StructuredOutput | None) -> None:
        """A structured output's grammar is compiled (and checked) off the event loop; submitting finds it
        cached."""
        if spec is not None:
            await prepare(self.submitter.backend.prepare_structured, spec)

    # -- chat ----------------------------------------------------------------------------------------------------
    async def prepare_chat(self, req: ChatCompletionRequest) -> tuple[Submitted, ChatPlan]:
        self.models.check(req.model)
        _log_metadata(req)
        mode = req.tool_mode()
        plan = ChatPlan(mode, req.tool_specs(), req.parallel_tool_calls is not False)
        if mode == "named":
            plan.tools = [t for t in plan.tools if t.name == req.tool_choice.function.name]  # type: ignore[union-attr]
        messages = chat_messages(req.messages)
        self.limits.check_text([message_text(m) for m in messages], "messages")
        offered = req.tool_specs() if mode != "none" else None
        ids, images = await tokenize(self._encode_chat, messages, offered)
        remaining = self._remaining(len(ids), "messages")
        max_tokens = req.requested_max_tokens()
        sampling = req.to_sampling(max_tokens if max_tokens is not None else remaining, req.logprobs,
                                   req.top_logprobs or 0, structured=req.tool_structure(mode))
        await self._compile(sampling[0].structured)
        return self.submitter.submit(ids, sampling, req.steering_spec(), images=images), plan

    def _encode_chat(self, messages: list[dict[str, Any]],
                     tools: list[ToolSpec] | None) -> tuple[list[int], tuple[PromptImage, ...]]:
        """Load and check the messages' images, then encode them (on the tokenizing thread)."""
        return self.inputs.encode_chat_prompt(load_message_images(messages, self.limits.images), True, tools)

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        sub, plan = await self.prepare_chat(req)
        results = await self.submitter.collect(sub)
        choices, completion = [], 0
        for i, outs in enumerate(results):
            last = outs[-1]
            completion += last.num_generated_tokens
            lps = [lp for o in outs for lp in o.logprobs]
            message, finish = plan.message("".join(o.text for o in outs), last.finish_reason)
            choices.append(ChatChoice(
                index=i, message=message, logprobs=chat_logprobs(self.inputs, lps) if req.logprobs else None,
                finish_reason=finish, stop_reason=last.stop_reason,
            ))
        return ChatCompletionResponse(id=new_id("chatcmpl"), model=self.models.name, choices=choices,
                                      usage=_usage([sub], completion), steering=sub.applied())

    async def stream_chat(self, req: ChatCompletionRequest) -> AsyncIterator[str]:
        """Submit now (errors raise here, before the response starts), then stream the events."""
        sub, plan = await self.prepare_chat(req)
        return self._chat_events(req, sub, plan)

    async def _chat_events(self, req: ChatCompletionRequest, sub: Submitted, plan: ChatPlan) -> AsyncIterator[str]:
        """Text streams as it comes. A named call streams as argument deltas; with ``auto`` or ``required``,
        whether the output is a call is known only at its end, so each choice's text is held back and sent then,
        as tool calls or as content."""
        base = dict(id=new_id("chatcmpl"), created=int(time.time()), model=self.models.name)
        applied = sub.applied()
        held = plan.mode in ("auto", "required")
        texts = [""] * len(sub.handles)
        call_ids = [ToolCall(plan.tools[0].name, "").id if plan.mode == "named" else "" for _ in sub.handles]

        def chunk(i: int, delta: DeltaMessage, out: RequestOutput | None = None, finish: str | None = None,
                  **extra: object) -> str:
            lp = chat_logprobs(self.inputs, out.logprobs) if out is not None and req.logprobs and out.logprobs \
                else None
            c = ChatCompletionChunk(**base, choices=[ChatChunkChoice(
                index=i, delta=delta, logprobs=lp, finish_reason=finish,
                stop_reason=None if out is None else out.stop_reason)], **extra).model_dump(exclude_none=True)
            c["choices"][0]["finish_reason"] = finish
            return sse(c)

        for i in range(len(sub.handles)):
            yield chunk(i, DeltaMessage(role="assistant", content=""), steering=applied if i == 0 else None)
            if plan.mode == "named":
                yield chunk(i, DeltaMessage(tool_calls=[DeltaToolCall(index=0, id=call_ids[i], type="function",
                                                                      function=DeltaFunction(
                                                                          name=plan.tools[0].name,
                                                                          arguments=""))]))
        completion = 0
        async for i, out in self.submitter.merge(sub):
            error = self.submitter.stop_error(out)
            if error is not None:
                yield error_event(error)
                break
            if out.finished:
                completion += out.num_generated_tokens
            texts[i] += out.text
            if held:
                if out.finished:
                    message, finish = plan.message(texts[i], out.finish_reason)
                    if message.tool_calls:
                        deltas = [DeltaToolCall(index=k, id=c.id, type="function", function=DeltaFunction(
                            name=c.function.name, arguments=c.function.arguments))
                            for k, c in enumerate(message.tool_calls)]
                        yield chunk(i, DeltaMessage(tool_calls=deltas), out, finish)
                    else:
                        yield chunk(i, DeltaMessage(content=message.content or None), out, finish)
                continue
            if not out.text and not out.finished and not (req.logprobs and out.logprobs):
                continue
            if plan.mode == "named":
                delta = DeltaMessage(tool_calls=[DeltaToolCall(index=0, function=DeltaFunction(
                    arguments=out.text))]) if out.text else DeltaMessage()
            else:
                delta = DeltaMessage(content=out.text or None)
            yield chunk(i, delta, out, out.finish_reason if out.finished else None)
        else:
            if req.include_usage:
                usage = ChatCompletionChunk(**base, choices=[], usage=_usage([sub], completion))
                yield sse(usage.model_dump(exclude_none=True) | {"choices": []})
        yield DONE

    # -- completions ---------------------------------------------------------------------------------------------
    async def _encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            self.limits.check_text([prompt], "prompt")
            ids = await tokenize(self.inputs.encode_text, prompt)
        else:
            vocab = self.models.info.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"token ids must be in [0, {vocab}); got {bad[:5]}", param="prompt")
            ids = list(prompt)
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return ids

    async def prepare_completion(self, req: CompletionRequest) -> list[Submitted]:
        """One submission per prompt, all or none."""
        self.models.check(req.model)
        _log_metadata(req)
        if req.max_tokens == 0 and not req.echo:
            raise InvalidRequestError("max_tokens 0 generates nothing: it needs echo (to score the prompt)",
                                      param="max_tokens")
        prompts = req.prompts()
        room = self.submitter.backend.stats().max_waiting
        if len(prompts) > 1 and len(prompts) * req.n > room:
            raise InvalidRequestError(f"{len(prompts)} prompts × n={req.n} choices can never be queued here: this "
                                      f"server queues at most {room} requests", param="prompt")
        encoded = [await self._encode_prompt(p) for p in prompts]
        structured = req.structured()
        await self._compile(structured)
        plans = []
        for ids in encoded:
            if req.max_tokens is not None:
                self._remaining(len(ids), "prompt", generating=req.max_tokens > 0)
                max_tokens = req.max_tokens
            else:
                max_tokens = min(DEFAULT_COMPLETION_TOKENS, self._remaining(len(ids), "prompt"))
            prompt_lp = (req.logprobs or 0) if req.echo and (req.logprobs is not None or max_tokens == 0) else None
            plans.append((ids, req.to_sampling(max_tokens, req.logprobs is not None, req.logprobs or 0,
                                               structured=structured, prompt_logprobs=prompt_lp)))
        subs: list[Submitted] = []
        try:
            for k, (ids, sampling) in enumerate(plans):
                subs.append(self.submitter.submit(ids, sampling, req.steering_spec(), count=k == 0))
        except BaseException:
            self.submitter.abandon(_together(subs))
            raise
        return subs

    def _echo(self, req: CompletionRequest, prompt: str | list[int], ids: list[int],
              first: RequestOutput) -> tuple[str, CompletionLogprobs | None]:
        """The prompt's text, and with ``logprobs`` its tokens' log-probabilities (the first has none)."""
        text = prompt if isinstance(prompt, str) else self.inputs.decode(ids)
        if req.logprobs is None:
            return text, None
        return text, prompt_logprobs(self.inputs, ids, first.prompt_logprobs or [])

    async def complete(self, req: CompletionRequest) -> CompletionResponse:
        subs = await self.prepare_completion(req)
        prompts = req.prompts()
        results = await self.submitter.collect(_together(subs))
        choices, completion = [], 0
        for k, outs in enumerate(results):
            p = k // req.n
            last = outs[-1]
            completion += last.num_generated_tokens
            prefix, lp = "", None
            if req.echo:
                prefix, lp = self._echo(req, prompts[p], subs[p].handles[0].request.prompt_token_ids, outs[0])
            if req.logprobs is not None:
                gen = completion_logprobs(self.inputs, [x for o in outs for x in o.logprobs], len(prefix))
                lp = gen if lp is None else lp.extend(gen)
            choices.append(CompletionChoice(index=k, text=prefix + "".join(o.text for o in outs), logprobs=lp,
                                            finish_reason=last.finish_reason, stop_reason=last.stop_reason))
        return CompletionResponse(id=new_id("cmpl"), model=self.models.name, choices=choices,
                                  usage=_usage(subs, completion), steering=subs[0].applied())

    async def stream_completion(self, req: CompletionRequest) -> AsyncIterator[str]:
        return self._completion_events(req, await self.prepare_completion(req))

    async def _completion_events(self, req: CompletionRequest, subs: list[Submitted]) -> AsyncIterator[str]:
        """The choices of every prompt interleave as they come (choice k is prompt k // n's)."""
        base = dict(id=new_id("cmpl"), created=int(time.time()), model=self.models.name)
        applied = subs[0].applied()
        prompts = req.prompts()
        together = _together(subs)
        completion, sent_steering = 0, False
        offsets = [0] * len(together.handles)
        echoed = [not req.echo] * len(together.handles)
        async for k, out in self.submitter.merge(together):
            error = self.submitter.stop_error(out)
            if error is not None:
                yield error_event(error)
                break
            text, lp = "", None
            if not echoed[k]:
                p = k // req.n
                text, lp = self._echo(req, prompts[p], subs[p].handles[0].request.prompt_token_ids, out)
                echoed[k] = True
                offsets[k] = len(text)
            elif not out.text and not out.finished and not (req.logprobs is not None and out.logprobs):
                continue
            if out.finished:
                completion += out.num_generated_tokens
            if req.logprobs is not None and out.logprobs:
                gen = completion_logprobs(self.inputs, out.logprobs, offsets[k])
                lp = gen if lp is None else lp.extend(gen)
            offsets[k] += len(out.text)
            chunk = CompletionResponse(**base, choices=[CompletionChoice(
                index=k, text=text + out.text, logprobs=lp, finish_reason=out.finish_reason,
                stop_reason=out.stop_reason)],
                steering=None if sent_steering else applied).model_dump(exclude_none=True)
            chunk["choices"][0]["finish_reason"] = out.finish_reason
            sent_steering = True
            yield sse(chunk)
        else:
            if req.include_usage:
                yield sse(CompletionResponse(**base, choices=[], usage=_usage(subs, completion)).model_dump(
                    exclude_none=True))
        yield DONE


def _together(subs: list[Submitted]) -> Submitted:
    """Every prompt's choices as one submission, merged and cancelled together."""
    return Submitted([h for s in subs for h in s.handles], sum(s.prompt_len for s in subs))
