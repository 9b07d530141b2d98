"""Background model jobs (attribution, vector builds, evaluation) run in chunks on the engine's thread.

A job is a generator function taking a :class:`JobContext`. Each ``next()`` runs one *chunk* of model work
(one batched forward, or a forward and its backward passes, sized to a token budget) and yields a
:class:`Progress`; the engine advances one chunk of one job per loop iteration, between generation steps, so a
running job delays generation by at most one chunk at a time. Jobs take turns (round robin).

Rules for job code: do not hold a grad-mode or hook context across a ``yield`` (the engine runs each chunk
under ``torch.no_grad()``; use ``torch.enable_grad()`` inside a chunk), and leave the model as found at every
``yield`` (for example the attention implementation).

Outside a server, :func:`run_job` drives a job to completion on the calling thread. Work that must *wait* on
the engine (an evaluation that generates, then scores) cannot run as a job on the engine's own thread; it runs
on a thread of its own with :func:`start_thread_job`, submitting generations and jobs to the engine, and is
tracked through the same :class:`JobHandle`.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from steering.errors import EngineError
from steering.hooks import SteeringHooks
from steering.loading import LoadedModel

T = TypeVar("T")


class JobCancelledError(EngineError):
    """The job was cancelled before it finished."""


@dataclass
class Progress:
    done: int
    total: int | None = None
    stage: str = ""
    fraction: float | None = None
    """Of the whole job (0..1), when the job can estimate it; else done / total is the stage's."""

    def overall(self) -> float | None:
        if self.fraction is not None:
            return self.fraction
        return self.done / self.total if self.total else None


def scaled(gen: Generator[Progress | None, None, T], start: float, end: float) -> Generator[Progress, None, T]:
    """Run a job sub-generator, mapping its stage progress onto [start, end] of the whole job."""
    try:
        item = next(gen)
        while True:
            if isinstance(item, Progress):
                f = item.overall() or 0.0  # a nested scaled() already gives the sub-job's own fraction
                item = Progress(item.done, item.total, item.stage, start + (end - start) * min(1.0, f))
            item = gen.send((yield item))
    except StopIteration as stop:
        return stop.value


@dataclass
class JobContext:
    """What a job's code may use: the model, the engine's steering hooks, and its own handle."""

    lm: LoadedModel
    hooks: SteeringHooks | None
    handle: "JobHandle"
    chunk_tokens: int = 2048
    """Token budget of one chunk: rows x sequence length of one forward (and its backward)."""

    @property
    def cancelled(self) -> bool:
        return self.handle.cancelled


Work = Callable[[JobContext], Generator[Progress | None, None, T]]


@dataclass
class JobMetrics:
    arrival_time: float = field(default_factory=time.monotonic)
    start_time: float | None = None
    finished_time: float | None = None
    chunks: int = 0
    compute_seconds: float = 0.0
    """Seconds spent in this job's chunks (the rest of its wall time went to generation and other jobs)."""


class JobHandle(Generic[T]):
    """The caller's side of a job: wait for its result (sync or async), read its progress, or cancel it."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop | None = None,
                 on_cancel: Callable[[], None] | None = None) -> None:
        self.name = name
        self.job_id = f"job-{uuid.uuid4().hex[:16]}"
        self.metrics = JobMetrics()
        self.progress = Progress(0)
        self._done = threading.Event()
        self._cancelled = threading.Event()
        self._result: T | None = None
        self._error: BaseException | None = None
        self._loop = loop
        self._future: asyncio.Future | None = loop.create_future() if loop else None
        self._on_cancel = on_cancel

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop the job at its next chunk boundary; waiting callers get :class:`JobCancelledError`."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            if self._on_cancel is not None:
                self._on_cancel()

    def _finish(self, result: T | None = None, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        self._result, self._error = result, error
        self.metrics.finished_time = time.monotonic()
        self._done.set()
        if self._future is not None:
            def settle(fut: asyncio.Future = self._future) -> None:
                if fut.done():
                    return
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(result)
            try:
                self._loop.call_soon_threadsafe(settle)
            except RuntimeError:  # the caller's loop is closed: nobody is waiting
                pass

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


class _Job:
    __slots__ = ("work", "handle", "gen", "ctx")

    def __init__(self, work: Work, handle: JobHandle) -> None:
        self.work = work
        self.handle = handle
        self.gen: Generator | None = None
        self.ctx: JobContext | None = None


def advance(job: _Job, lm: LoadedModel, hooks: SteeringHooks | None, chunk_tokens: int) -> bool:
    """Run one chunk of ``job``; return True when the job has ended (finished, failed or cancelled)."""
    h = job.handle
    if h.cancelled:
        close(job, JobCancelledError(f"job {h.job_id} was cancelled"))
        return True
    t0 = time.monotonic()
    try:
        with torch.inference_mode(False), torch.no_grad():
            if job.gen is None:
                h.metrics.start_time = t0
                job.ctx = JobContext(lm, hooks, h, chunk_tokens)
                job.gen = job.work(job.ctx)
            progress = next(job.gen)
    except StopIteration as stop:
        _account(h, t0)
        h._finish(result=stop.value)
        return True
    except BaseException as exc:  # noqa: BLE001 - a failing job fails only itself
        _account(h, t0)
        h._finish(error=exc)
        return True
    _account(h, t0)
    if isinstance(progress, Progress):
        h.progress = progress
    return False


def close(job: _Job, error: BaseException) -> None:
    if job.gen is not None:
        job.gen.close()
    job.handle._finish(error=error)


def _account(h: JobHandle, t0: float) -> None:
    h.metrics.chunks += 1
    h.metrics.compute_seconds += time.monotonic() - t0


def run_job(work: Work[T], lm: LoadedModel, *, hooks: SteeringHooks | None = None, chunk_tokens: int = 2048,
            name: str = "job", on_progress: Callable[[Progress], Any] | None = None) -> T:
    """Run a job to completion on this thread (scripts, tests, CLIs). Without ``hooks``, steering hooks are
    installed on the model for the job's duration and removed afterwards."""
    own = hooks is None
    hooks = hooks or SteeringHooks(lm.layers)
    job = _Job(work, JobHandle(name))
    try:
        while not advance(job, lm, hooks, chunk_tokens):
            if on_progress is not None:
                on_progress(job.handle.progress)
        return job.handle.result()
    finally:
        if own:
            hooks.remove()


def start_thread_job(name: str, fn: Callable[[JobHandle], T], loop: asyncio.AbstractEventLoop | None = None,
                     on_cancel: Callable[[], None] | None = None) -> JobHandle[T]:
    """Run ``fn(handle)`` on a new daemon thread; ``fn`` reports through ``handle.progress`` and should stop with
    :class:`JobCancelledError` once ``handle.cancelled``. ``on_cancel`` runs when the handle is cancelled (to
    cancel what ``fn`` is waiting on). Its ``compute_seconds`` is the thread's wall time."""
    handle: JobHandle[T] = JobHandle(name, loop, on_cancel)

    def main() -> None:
        t0 = handle.metrics.start_time = time.monotonic()
        try:
            result = fn(handle)
        except BaseException as exc:  # noqa: BLE001 - reported to whoever waits on the handle
            handle.metrics.compute_seconds = time.monotonic() - t0
            handle._finish(error=exc)
        else:
            handle.metrics.compute_seconds = time.monotonic() - t0
            handle._finish(result=result)

    threading.Thread(target=main, name=f"steerserve-{name}", daemon=True).start()
    return handle
