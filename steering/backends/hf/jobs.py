"""Running jobs (:mod:`steering.engine.jobs`) on the Hugging Face backend: one chunk at a time, each under
``torch.no_grad()``, every forward through the runner. The engine advances its jobs between generation steps;
:func:`run_job` drives one to the end on the calling thread (scripts, tests, the command line)."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar

import torch

from steering.backends.hf.hooks import DeviceApplication
from steering.backends.hf.loading import LoadedModel
from steering.backends.hf.runner import ModelRunner
from steering.engine.handles import JobHandle
from steering.engine.jobs import JobContext, Work
from steering.engine.types import Progress
from steering.errors import JobCancelledError
from steering.spec import ResolvedApplication

T = TypeVar("T")


class HFJobContext(JobContext):
    def __init__(self, runner: ModelRunner, handle: JobHandle[Any], chunk_tokens: int) -> None:
        self.runner = runner
        self.lm: LoadedModel = runner.lm
        self.handle = handle
        self.chunk_tokens = chunk_tokens
        self.vision = runner.images

    def steering(self, applications: Sequence[ResolvedApplication]) -> list[DeviceApplication]:
        return self.runner.device_steering(applications)

    def forward(self, *, positions: torch.Tensor, prompt_lens: torch.Tensor, input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                steering: Sequence[Any] | None = None, capture: Callable[[int, torch.Tensor], None] | None = None,
                output_attentions: bool = False, rope_positions: torch.Tensor | None = None) -> Any:
        return self.runner.forward(positions=positions, prompt_lens=prompt_lens, input_ids=input_ids,
                                   inputs_embeds=inputs_embeds, keep=keep, steering=steering, capture=capture,
                                   output_attentions=output_attentions, rope_positions=rope_positions)


class JobRun:
    """A job the engine is running: its work, handle, and (once started) its generator."""

    __slots__ = ("work", "handle", "gen")

    def __init__(self, work: Work[Any], handle: JobHandle[Any]) -> None:
        self.work = work
        self.handle = handle
        self.gen: Generator[Progress | None, Any, Any] | None = None

    def advance(self, runner: ModelRunner, chunk_tokens: int) -> bool:
        """Run one chunk; return True when the job has ended (finished, failed or cancelled)."""
        h = self.handle
        if h.cancelled:
            self.close(JobCancelledError(f"job {h.job_id} was cancelled"))
            return True
        t0 = time.monotonic()
        try:
            with torch.inference_mode(False), torch.no_grad():
                if self.gen is None:
                    h.metrics.start_time = t0
                    self.gen = self.work(HFJobContext(runner, h, chunk_tokens))
                progress = next(self.gen)
        except StopIteration as stop:
            self._account(t0)
            h.finish(result=stop.value)
            return True
        except BaseException as exc:  # noqa: BLE001 - a failing job fails only itself
            self._account(t0)
            h.finish(error=exc)
            return True
        self._account(t0)
        if isinstance(progress, Progress):
            h.progress = progress
        return False

    def close(self, error: BaseException) -> None:
        if self.gen is not None:
            self.gen.close()
        self.handle.finish(error=error)

    def _account(self, t0: float) -> None:
        m = self.handle.metrics
        m.chunks += 1
        m.compute_seconds += time.monotonic() - t0


def run_job(work: Work[T], lm: LoadedModel | ModelRunner, *, chunk_tokens: int = 2048, name: str = "job",
            on_progress: Callable[[Progress], Any] | None = None) -> T:
    """Run a job to completion on this thread. Given a model (not a runner), a runner is made for the job's
    duration and its hooks removed afterwards."""
    own = isinstance(lm, LoadedModel)
    runner = ModelRunner(lm) if isinstance(lm, LoadedModel) else lm
    job = JobRun(work, JobHandle(name))
    try:
        while not job.advance(runner, chunk_tokens):
            if on_progress is not None:
                on_progress(job.handle.progress)
        return job.handle.result()
    finally:
        if own:
            runner.close()
