"""The caller's side of a request or a job, safe across threads.

A backend produces results on its own thread; a caller waits for them on another thread or on an asyncio
loop. :class:`_LoopBridge` is the one place that crosses over: it hands a value to the caller's loop with
``call_soon_threadsafe`` and notices when that loop is gone (then nobody is listening and the work is
cancelled). :class:`RequestHandle` streams deltas; :class:`JobHandle` settles once, with a result or an error.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from steering.engine.types import (
    GenerationRequest,
    GenerationResult,
    JobMetrics,
    Progress,
    RequestMetrics,
    RequestOutput,
)

if TYPE_CHECKING:
    from steering.spec import ResolvedSteering

T = TypeVar("T")


class _LoopBridge:
    """Cancellation and delivery shared by both handles: a cancel flag and the caller's loop, if any."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None, on_cancel: Callable[[], None] | None) -> None:
        self.loop = loop
        self._cancelled = threading.Event()
        self._on_cancel = on_cancel

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        if not self._cancelled.is_set():
            self._cancelled.set()
            if self._on_cancel is not None:
                self._on_cancel()

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the caller's loop; if that loop is closed, nobody listens: cancel."""
        assert self.loop is not None
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            self._cancelled.set()


class RequestHandle:
    """A submitted generation: iterate it (sync or async) for deltas, or cancel it."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None,
                 on_cancel: Callable[[], None] | None = None, steering: ResolvedSteering | None = None) -> None:
        self.request = request
        self.request_id = request.request_id
        self.steering = steering
        """The steering the backend applies, resolved (named vectors looked up, layers filled in)."""
        self.metrics: RequestMetrics | None = None
        """The backend's timing record, live while it runs."""
        self._bridge = _LoopBridge(loop, on_cancel)
        self._async_q: asyncio.Queue[RequestOutput] | None = asyncio.Queue() if loop else None
        self._sync_q: queue.SimpleQueue[RequestOutput] | None = None if loop else queue.SimpleQueue()

    @property
    def cancelled(self) -> bool:
        return self._bridge.cancelled

    def cancel(self) -> None:
        """Abort the request; its slot is freed at the next step and a final ``abort`` delta is sent."""
        self._bridge.cancel()

    def deliver(self, out: RequestOutput) -> None:
        """Called by the backend, on any thread, with each delta in order."""
        if self._async_q is not None:
            self._bridge.call(self._async_q.put_nowait, out)
        else:
            assert self._sync_q is not None
            self._sync_q.put(out)

    def __iter__(self) -> Iterator[RequestOutput]:
        if self._sync_q is None:
            raise TypeError("this handle was submitted with an event loop; use `async for`")
        while True:
            out = self._sync_q.get()
            yield out
            if out.finished:
                return

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        if self._async_q is None:
            raise TypeError("this handle was submitted without an event loop; iterate it synchronously")
        while True:
            out = await self._async_q.get()
            yield out
            if out.finished:
                return

    def _collect(self, outs: Sequence[RequestOutput]) -> GenerationResult:
        last = outs[-1]
        if last.finish_reason == "error" and last.error is not None:
            raise last.error
        return GenerationResult(
            request_id=self.request_id, prompt_token_ids=list(self.request.prompt_token_ids),
            token_ids=[t for o in outs for t in o.token_ids], text="".join(o.text for o in outs),
            logprobs=[lp for o in outs for lp in o.logprobs], finish_reason=last.finish_reason,
            stop_reason=last.stop_reason, metrics=last.metrics,
            num_cached_tokens=next((o.num_cached_tokens for o in reversed(outs) if o.num_cached_tokens is not None),
                                   None),
            prompt_logprobs=next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None),
            steering_telemetry=last.steering_telemetry,
        )

    def result(self) -> GenerationResult:
        """Block until finished; raise the request's error if it failed."""
        return self._collect(list(self))

    async def aresult(self) -> GenerationResult:
        return self._collect([o async for o in self])


class JobHandle(Generic[T]):
    """A submitted job: wait for its result (sync or async), read its progress, or cancel it."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop | None = None,
                 on_cancel: Callable[[], None] | None = None) -> None:
        self.name = name
        self.job_id = f"job-{uuid.uuid4().hex[:16]}"
        self.metrics: JobMetrics = JobMetrics()
        self.progress: Progress = Progress(0)
        self._bridge = _LoopBridge(loop, on_cancel)
        self._done = threading.Event()
        self._result: T | None = None
        self._error: BaseException | None = None
        self._future: asyncio.Future[T] | None = loop.create_future() if loop else None

    @property
    def cancelled(self) -> bool:
        return self._bridge.cancelled

    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop the job at its next chunk boundary; waiting callers get :class:`JobCancelledError`."""
        self._bridge.cancel()

    def finish(self, result: T | None = None, error: BaseException | None = None) -> None:
        """Called by the backend once, on any thread, when the job has ended."""
        if self._done.is_set():
            return
        self._result, self._error = result, error
        self.metrics.finished_time = time.monotonic()
        self._done.set()
        if self._future is not None:
            self._bridge.call(self._settle, self._future, result, error)

    @staticmethod
    def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def result(self, timeout: float | None = None) -> T:
        if not self._done.wait(timeout):
            raise TimeoutError(f"job {self.job_id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    async def aresult(self) -> T:
        if self._future is None:
            raise TypeError("this job was submitted without an event loop; use result()")
        return await self._future
