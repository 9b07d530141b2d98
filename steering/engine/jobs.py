"""Background model jobs (attribution, vector builds, sweeps, evaluation): the contract between job code and the
analysis backend that runs it.

A job is a generator function taking a :class:`JobContext`. Each ``next()`` runs one *chunk* of model work
(one batched forward, or a forward and its backward passes, sized to ``ctx.chunk_tokens``) and yields a
:class:`Progress`; the backend advances one chunk of one job at a time, between generation steps, so a running
job delays generation by at most one chunk. Jobs take turns (round robin).

Rules for job code: do not hold a grad-mode or hook context across a ``yield`` (each chunk runs under
``torch.no_grad()``; use ``torch.enable_grad()`` inside a chunk), and leave the model as found at every
``yield`` (for example the attention implementation). Every forward goes through :meth:`JobContext.forward`,
the backend's one steered forward.

Work that must *wait* on a backend (an evaluation that generates, then scores) cannot run as a job on the
backend's own thread; it runs on a thread of its own with :func:`start_thread_job`, submitting generations and
jobs like any client, and is tracked through the same :class:`JobHandle`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar

from steering.engine.handles import JobHandle
from steering.engine.types import JobMetrics, Progress
from steering.errors import JobCancelledError
from steering.spec import ResolvedApplication

T = TypeVar("T")

__all__ = ["JobCancelledError", "JobContext", "JobHandle", "JobMetrics", "Progress", "Work", "scaled",
           "start_thread_job"]


def scaled(gen: Generator[Progress | None, Any, T], start: float, end: float) -> Generator[Progress, Any, T]:
    """Run a job sub-generator, mapping its stage progress onto [start, end] of the whole job."""
    try:
        item = next(gen)
        while True:
            if isinstance(item, Progress):
                f = item.overall() or 0.0  # a nested scaled() already gives the sub-job's own fraction
                item = Progress(item.done, item.total, item.stage, start + (end - start) * min(1.0, f))
            item = gen.send((yield item))  # type: ignore[misc]
    except StopIteration as stop:
        return stop.value


class JobContext(ABC):
    """What a job's code may use: the loaded model, the backend's steered forward, and its own handle."""

    lm: Any
    """The backend's loaded model (for the Hugging Face backend, ``steering.backends.hf.LoadedModel``: its
    embeddings, LM head and tokenizer)."""
    handle: JobHandle[Any]
    chunk_tokens: int
    """Token budget of one chunk: rows x sequence length of one forward (and its backward)."""
    vision: Any = None
    """A vision-language model's images (None: text only): ``features(image)`` [tokens, hidden], ``embed(ids,
    rows)`` (token embeddings with each row's images' features in place), ``keep(keep, rows)`` (attention inside
    an image both ways, where the model does that), ``prompt_rope(ids, images)`` (multimodal rotary positions and
    the offset of later tokens), and ``front`` (:class:`steering.vision.VisionFront`). :mod:`steering.tasks.scoring`
    builds packed rows' inputs from them (for the Hugging Face backend:
    :class:`steering.backends.hf.vision.ImageEncoder`)."""

    @property
    def cancelled(self) -> bool:
        return self.handle.cancelled

    @abstractmethod
    def steering(self, applications: Sequence[ResolvedApplication]) -> Any:
        """The applications on the model's device, ready to pass to :meth:`forward` (reuse it across chunks)."""

    @abstractmethod
    def forward(self, *, positions: Any, prompt_lens: Any, input_ids: Any = None, inputs_embeds: Any = None,
                keep: Any = None, steering: Sequence[Any] | None = None,
                capture: Callable[[int, Any], None] | None = None, output_attentions: bool = False,
                rope_positions: Any = None) -> Any:
        """One forward of the decoder with per-row steering; returns the model's output
        (``last_hidden_state``, and ``attentions`` when asked).

        ``positions`` [n, L] absolute; ``prompt_lens`` [n] (the part steering treats as the prompt); token ids
        or embeddings [n, L(, d)]; ``keep`` [n, L, L] "query may see key" (None: causal); ``steering`` one
        entry of :meth:`steering` per row (empty: unsteered); ``capture(layer, hidden)`` sees every decoder
        layer's output after steering; ``rope_positions`` the model's rotary positions where they are not
        ``positions`` (multimodal, [3, n, L])."""


Work = Callable[[JobContext], Generator[Progress | None, Any, T]]


def start_thread_job(name: str, fn: Callable[[JobHandle[T]], T], loop: asyncio.AbstractEventLoop | None = None,
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
            handle.finish(error=exc)
        else:
            handle.metrics.compute_seconds = time.monotonic() - t0
            handle.finish(result=result)

    threading.Thread(target=main, name=f"steerserve-{name}", daemon=True).start()
    return handle
