"""A small fake backend: the contract (:mod:`steering.engine.base`) made executable without a model.

Its "model" is a pure function of the tokens so far and the steering active at the last position
(:func:`next_token`), so a test can compute the exact expected output. Requests run on a thread of its own in
steps, with bounded running and waiting sets, cancellation, stop conditions and deltas, as a real backend does.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from steering.engine.base import AnalysisBackend, GenerationBackend
from steering.engine.handles import JobHandle, RequestHandle
from steering.engine.jobs import JobContext, Work
from steering.engine.types import EngineStats, GenerationRequest, ModelInfo, Progress, RequestMetrics, RequestOutput
from steering.errors import EngineClosedError, QueueFullError, UnsupportedError
from steering.inputs import Inputs
from steering.sampling import SamplingParams, TokenLogprob
from steering.spec import ResolvedApplication, ResolvedSteering


def _active(app: ResolvedApplication, pos: int, prompt_len: int) -> bool:
    p = app.positions
    if p == "all":
        return True
    if p == "prompt":
        return pos < prompt_len
    if p == "generated":
        return pos >= prompt_len
    return pos in p


def next_token(tokens: Sequence[int], prompt_len: int, steering: ResolvedSteering | None, vocab: Sequence[int],
               sampling: SamplingParams, step: int) -> int:
    """The fake model: a hash of the last tokens and the length, shifted by the steering active at the last
    position; sampled (seeded) when the temperature is above 0."""
    pos = len(tokens) - 1
    h = (31 * tokens[-1] + 17 * (tokens[-2] if len(tokens) > 1 else 0) + 7 * len(tokens)) % 1_000_003
    if steering is not None:
        for app in steering.active:
            if _active(app, pos, prompt_len):
                h += round(app.scale * 10) * (3 if app.normalize else 1) + 101 * len(app.values)
    if not sampling.greedy:
        h += random.Random((sampling.seed or 0) * 7919 + step).randrange(1000)
    return vocab[h % len(vocab)]


@dataclass
class _Request:
    req: GenerationRequest
    handle: RequestHandle
    tokens: list[int]
    prompt_len: int
    generated: list[int] = field(default_factory=list)
    text: str = ""


class FakeBackend(GenerationBackend):
    """Generation only (its analysis endpoints are unavailable)."""

    kind = "fake"

    def __init__(self, tokenizer: Any, *, max_running: int = 4, max_waiting: int = 16, step_seconds: float = 0.001,
                 hidden_size: int = 16, num_layers: int = 4, max_model_len: int = 256) -> None:
        self._inputs = Inputs(tokenizer)
        vocab = len(tokenizer)
        self._info = ModelInfo(name="fake-model", architecture="FakeForCausalLM", model_type="fake",
                               hidden_size=hidden_size, num_layers=num_layers, max_model_len=max_model_len,
                               vocab_size=vocab)
        self.content_ids = [i for i in range(vocab) if i not in self._inputs.special_token_ids]
        self.eos_id = self._inputs.eos_token_id
        self.max_running, self.max_waiting, self.step_seconds = max_running, max_waiting, step_seconds
        self._lock = threading.Lock()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="fake-backend", daemon=True)
        self.submitted: list[GenerationRequest] = []
        """Every accepted request, in order (what tests inspect)."""

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def inputs(self) -> Inputs:
        return self._inputs

    def start(self) -> FakeBackend:
        if not self._thread.is_alive():
            self._thread.start()
        return self

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(running=len(self._running), waiting=len(self._waiting), jobs=0,
                               max_running=self.max_running, max_waiting=self.max_waiting)

    def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.stats().idle and self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(5)
        with self._lock:
            left = list(self._running) + list(self._waiting)
            self._running.clear()
            self._waiting.clear()
        for r in left:
            self._finish(r, "error", EngineClosedError("the engine stopped"))

    def reference(self, prompt: Sequence[int], sampling: SamplingParams,
                  steering: ResolvedSteering | None) -> list[int]:
        """What a request generates alone (greedy or seeded), by the model function itself."""
        tokens, out = list(prompt), []
        for step in range(sampling.max_tokens):
            tok = next_token(tokens, len(prompt), steering, self.content_ids, sampling, step)
            tokens.append(tok)
            out.append(tok)
            if tok in sampling.stop_token_ids:
                break
        return out

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        if not self.alive():
            raise EngineClosedError("the engine is not running")
        ids = request.prompt_token_ids
        resolved = self.check_request(request)
        handle = RequestHandle(request, loop, on_cancel=self._wake.set, steering=resolved)
        handle.metrics = RequestMetrics(arrival_time=time.monotonic())
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests); retry later")
            self._waiting.append(_Request(request, handle, list(ids), len(ids)))
            self.submitted.append(request)
        self._wake.set()
        return handle

    # -- the fake's own thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                busy = bool(self._running or self._waiting)
            if not busy:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self._step()
            time.sleep(self.step_seconds)

    def _step(self) -> None:
        with self._lock:
            for r in [r for r in self._waiting if r.handle.cancelled]:
                self._waiting.remove(r)
                self._finish(r, "abort")
            while self._waiting and len(self._running) < self.max_running:
                r = self._waiting.popleft()
                assert r.handle.metrics is not None
                r.handle.metrics.scheduled_time = time.monotonic()
                self._running.append(r)
            running = list(self._running)
        for r in running:
            if r.handle.cancelled:
                self._end(r, "abort")
                continue
            self._advance(r)

    def _advance(self, r: _Request) -> None:
        sp = r.req.sampling
        tok = next_token(r.tokens, r.prompt_len, r.handle.steering, self.content_ids, sp, len(r.generated))
        r.tokens.append(tok)
        r.generated.append(tok)
        text = self._inputs.decode(r.generated, skip_special_tokens=sp.skip_special_tokens)
        reason: str | None = None
        stop: str | int | None = None
        if tok in sp.stop_token_ids and len(r.generated) >= sp.min_tokens:
            reason, stop = "stop", tok
        elif any(s in text for s in sp.stop):
            reason = "stop"
            stop = next(s for s in sp.stop if s in text)
        elif len(r.generated) >= sp.max_tokens:
            reason = "length"
        delta = ""
        if reason is not None or not text.endswith("\ufffd"):  # hold back half a character
            delta, r.text = text[len(r.text):], text
        m = r.handle.metrics
        assert m is not None
        now = time.monotonic()
        m.first_token_time = m.first_token_time or now
        m.last_token_time = now
        lp = TokenLogprob(tok, -0.5, [(tok, -0.5)][: sp.top_logprobs]) if sp.logprobs else None
        out = RequestOutput(r.req.request_id, [tok], delta, [lp] if lp else [], r.prompt_len, len(r.generated),
                            finished=reason is not None, finish_reason=reason, stop_reason=stop, time=now)
        if reason is not None:
            m.finished_time = now
            out.metrics = m
            with self._lock:
                self._running.remove(r)
        r.handle.deliver(out)

    def _end(self, r: _Request, reason: str) -> None:
        with self._lock:
            if r in self._running:
                self._running.remove(r)
        self._finish(r, reason)

    @staticmethod
    def _finish(r: _Request, reason: str, error: Exception | None = None) -> None:
        m = r.handle.metrics
        if m is not None:
            m.finished_time = time.monotonic()
        r.handle.deliver(RequestOutput(r.req.request_id, [], "", [], r.prompt_len, len(r.generated), finished=True,
                                       finish_reason=reason, error=error, metrics=m, time=time.monotonic()))


class _FakeJobContext(JobContext):
    def __init__(self, handle: JobHandle[Any]) -> None:
        self.lm = None
        self.handle = handle
        self.chunk_tokens = 64

    def steering(self, applications: Sequence[ResolvedApplication]) -> Any:
        return list(applications)

    def forward(self, **kwargs: Any) -> Any:
        raise UnsupportedError("the fake backend has no model to run forwards on")


class FakeAnalysisBackend(FakeBackend, AnalysisBackend):
    """With the analysis capability: jobs run on a thread of their own, one chunk per step."""

    def __init__(self, tokenizer: Any, *, max_jobs: int = 4, **kwargs: Any) -> None:
        super().__init__(tokenizer, **kwargs)
        self.max_jobs = max_jobs
        self._jobs = 0

    def stats(self) -> EngineStats:
        s = super().stats()
        return EngineStats(s.running, s.waiting, self._jobs, s.max_running, s.max_waiting)

    def submit_job(self, work: Work[Any], name: str = "job",
                   loop: asyncio.AbstractEventLoop | None = None) -> JobHandle[Any]:
        if not self.alive():
            raise EngineClosedError("the engine is not running")
        with self._lock:
            if self._jobs >= self.max_jobs:
                raise QueueFullError(f"too many background jobs ({self.max_jobs}); retry later")
            self._jobs += 1
        handle: JobHandle[Any] = JobHandle(name, loop)
        threading.Thread(target=self._job, args=(work, handle), daemon=True).start()
        return handle

    def _job(self, work: Work[Any], handle: JobHandle[Any]) -> None:
        from steering.errors import JobCancelledError

        handle.metrics.start_time = t0 = time.monotonic()
        gen = work(_FakeJobContext(handle))
        try:
            while True:
                if handle.cancelled:
                    gen.close()
                    raise JobCancelledError(f"job {handle.job_id} was cancelled")
                item = next(gen)
                handle.metrics.chunks += 1
                if isinstance(item, Progress):
                    handle.progress = item
                time.sleep(self.step_seconds)
        except StopIteration as stop:
            handle.finish(result=stop.value)
        except BaseException as exc:  # noqa: BLE001 - the job's own failure
            handle.finish(error=exc)
        finally:
            handle.metrics.compute_seconds = time.monotonic() - t0
            with self._lock:
                self._jobs -= 1
