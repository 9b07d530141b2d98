"""Submitting generations from the event loop: each choice of a request goes to the backend, is accounted for
in the metrics, and streams back; when the consumer stops early (a client went away), it is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass

from server.metrics import Metrics, steering_labels
from server.protocol.common import AppliedSteering
from steering.engine.base import GenerationBackend
from steering.engine.handles import RequestHandle
from steering.engine.types import GenerationRequest, RequestOutput
from steering.errors import (
    EngineClosedError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    SteeringError,
)
from steering.multimodal import PromptImage
from steering.sampling import SamplingParams
from steering.spec import ResolvedSteering, SteeringSpec


@dataclass
class Submitted:
    handles: list[RequestHandle]
    prompt_len: int

    @property
    def steering(self) -> ResolvedSteering | None:
        return self.handles[0].steering

    def applied(self) -> list[AppliedSteering] | None:
        """What the backend applies, for responses."""
        s = self.steering
        return None if s is None else [AppliedSteering(**d) for d in s.describe()]


def rejection_reason(exc: SteeringError) -> str:
    if isinstance(exc, QueueFullError):
        return "queue_full"
    if isinstance(exc, EngineClosedError):
        return "unavailable"
    return "invalid_request"


class Submitter:
    def __init__(self, backend: GenerationBackend, metrics: Metrics) -> None:
        self.backend = backend
        self.metrics = metrics
        self.live: set[RequestHandle] = set()
        """Requests submitted and not yet finished."""
        self.stopped: str | None = None
        """Why the server stopped the live requests (it is shutting down), once it has."""

    def stop_all(self, reason: str) -> None:
        """Cancel every live request; their streams end with an error saying ``reason``."""
        self.stopped = reason
        for h in list(self.live):
            h.cancel()

    def stop_error(self, out: RequestOutput) -> SteeringError | None:
        """The error a request ends with: its own, or the server's when the server stopped it."""
        if out.finish_reason == "error":
            return out.error if isinstance(out.error, SteeringError) else \
                RequestFailedError(f"generation failed: {out.error}")
        if out.finish_reason == "abort" and self.stopped is not None:
            return EngineClosedError(self.stopped)
        return None

    def submit(self, prompt_ids: list[int], sampling: Sequence[SamplingParams],
               steering: SteeringSpec | None, count: bool = True, images: tuple[PromptImage, ...] = ()) -> Submitted:
        """Submit one request per sampling (the ``n`` choices); all or none are accepted. ``count``: whether this
        submission counts as a steered request (a batch of prompts counts once)."""
        loop = asyncio.get_running_loop()
        room = self.backend.stats().max_waiting
        if len(sampling) > room:  # refusals are counted where they become error responses (server.errors)
            raise InvalidRequestError(f"n={len(sampling)} choices can never be queued here: this server queues at "
                                      f"most {room} requests", param="n")
        handles: list[RequestHandle] = []
        try:
            for sp in sampling:
                handles.append(self.backend.submit(GenerationRequest(prompt_ids, sp, steering, images=images),
                                                   loop=loop))
        except SteeringError:
            for h in handles:
                h.cancel()
            raise
        self.live.update(handles)
        if count:
            self.metrics.generation_request()
        resolved = handles[0].steering
        if resolved is not None and count:  # one request, however many choices: once per vector that changes anything
            self.metrics.steered_request(steering_labels(resolved))
        return Submitted(handles, len(prompt_ids))

    def abandon(self, sub: Submitted) -> None:
        """Cancel a submission nobody will read (a later part of the same request was refused)."""
        for h in sub.handles:
            h.cancel()
            self.live.discard(h)

    async def stream(self, handle: RequestHandle) -> AsyncGenerator[RequestOutput, None]:
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
                    if out.steering_telemetry is not None and handle.steering is not None:
                        self.metrics.steering_measured(steering_labels(handle.steering), out.steering_telemetry)
                yield out
        finally:
            self.live.discard(handle)
            if not finished:
                handle.cancel()
                self.metrics.finished("abort", len(handle.request.prompt_token_ids), generated, handle.metrics)

    async def merge(self, sub: Submitted) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Interleave the deltas of the choices as they come; cancel all on early exit."""
        streams: list[AsyncGenerator[RequestOutput, None]] = [self.stream(h) for h in sub.handles]
        if len(streams) == 1:
            try:
                async for out in streams[0]:
                    yield 0, out
            finally:
                await streams[0].aclose()
            return
        queue: asyncio.Queue[tuple[int, RequestOutput | None]] = asyncio.Queue()

        async def pump(i: int, stream: AsyncGenerator[RequestOutput, None]) -> None:
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
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def collect(self, sub: Submitted) -> list[list[RequestOutput]]:
        """Every choice's deltas; a choice that failed fails the request."""
        results: list[list[RequestOutput]] = [[] for _ in sub.handles]
        async for i, out in self.merge(sub):
            results[i].append(out)
        for outs in results:
            error = self.stop_error(outs[-1])
            if error is not None:
                raise error
        return results
