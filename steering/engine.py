"""The continuous-batching engine: one inference thread owns the model; callers submit from anywhere.

Requests enter through a queue and wait (bounded) until a batch slot is free. Each loop iteration of the
inference thread (a *step*):

1. takes in new requests and drops cancelled ones (their slot is freed at once);
2. admits waiting requests into free slots and prefills them together, giving each its first token;
3. runs one decode forward for every running sequence, each row with its own position, steering and
   sampling, and hands each request its new token;
4. removes finished sequences.

A request that arrives while others decode therefore joins the running batch at the next step. Steering is
read by hooks installed once at load (:mod:`steering.hooks`); per forward the engine sets the rows'
steering and clears it in ``finally``. Positions are absolute, so steering by position gives the same
result with and without the KV cache (``use_kv_cache=False`` recomputes every sequence each step).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from steering.detokenize import IncrementalDetokenizer
from steering.errors import (
    EngineClosedError,
    QueueFullError,
    RequestFailedError,
    RequestValidationError,
)
from steering.hooks import SteeringBatch, SteeringHooks, StepSteering
from steering.jobs import JobHandle, Work, _Job, advance, close
from steering.kv_cache import SlotKVCache
from steering.loading import LoadedModel
from steering.packing import AttentionMasks
from steering.sampling import RowSampling, SamplingParams, TokenLogprob, make_generator, sample
from steering.spec import ResolvedApplication, SteeringSpec, resolve

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_batch_size: int = 16
    """Most sequences decoded together."""
    max_queue_size: int = 256
    """Most requests accepted but not yet running; beyond it ``submit`` raises QueueFullError."""
    max_model_len: int | None = None
    """Longest prompt + completion; default: the model's context length, at most 8192."""
    max_prefill_tokens: int = 4096
    """Padded prompt tokens prefilled in one step (at least one request is always admitted)."""
    use_kv_cache: bool = True
    kv_initial_capacity: int = 256
    max_jobs: int = 64
    """Most background jobs (attribution, vector builds, evaluation) queued or running."""
    job_chunk_tokens: int = 2048
    """Token budget of one job chunk (rows x length of one forward and its backward); generation waits at
    most one chunk for a job."""


@dataclass
class GenerationRequest:
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    steering: SteeringSpec | None = None
    request_id: str = field(default_factory=lambda: f"req-{uuid.uuid4().hex}")


@dataclass
class RequestMetrics:
    arrival_time: float
    scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def queue_time(self) -> float | None:
        return None if self.scheduled_time is None else self.scheduled_time - self.arrival_time


@dataclass
class RequestOutput:
    """What one step produced for one request: a delta. The last one has ``finished`` set."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    num_prompt_tokens: int
    num_generated_tokens: int
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    error: Exception | None = None
    metrics: RequestMetrics | None = None
    time: float = 0.0  # time.monotonic() when the engine produced it


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    stop_reason: str | int | None
    metrics: RequestMetrics | None


class RequestHandle:
    """The caller's side of a request: iterate it (sync or async) for deltas, or cancel it."""

    def __init__(self, request: GenerationRequest, engine: "Engine",
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.request = request
        self.request_id = request.request_id
        self._engine = engine
        self._cancelled = threading.Event()
        self._loop = loop
        self._async_q: asyncio.Queue[RequestOutput] | None = asyncio.Queue() if loop else None
        self._sync_q: queue.Queue[RequestOutput] | None = None if loop else queue.Queue()
        self.metrics: RequestMetrics | None = None  # the engine's timing record, live while it runs

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Abort the request; its slot is freed at the next step and a final ``abort`` delta is sent."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._engine._wake()

    def _push(self, out: RequestOutput) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._async_q.put_nowait, out)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                self._cancelled.set()
        else:
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

    @staticmethod
    def _collect(request: GenerationRequest, outs: Sequence[RequestOutput]) -> GenerationResult:
        last = outs[-1]
        if last.finish_reason == "error" and last.error is not None:
            raise last.error
        return GenerationResult(
            request_id=request.request_id, prompt_token_ids=list(request.prompt_token_ids),
            token_ids=[t for o in outs for t in o.token_ids], text="".join(o.text for o in outs),
            logprobs=[lp for o in outs for lp in o.logprobs], finish_reason=last.finish_reason,
            stop_reason=last.stop_reason, metrics=last.metrics,
        )

    def result(self) -> GenerationResult:
        """Block until finished; raise the request's error if it failed."""
        return self._collect(self.request, list(self))

    async def aresult(self) -> GenerationResult:
        return self._collect(self.request, [o async for o in self])


class _Sequence:
    __slots__ = ("uid", "req", "handle", "params", "tokens", "prompt_len", "generated", "detok", "generator", "apps",
                 "metrics", "pending_logprobs", "banned_until_min", "eos_ids", "finish_reason", "stop_reason")

    def __init__(self, req: GenerationRequest, handle: RequestHandle, apps: list[ResolvedApplication],
                 tokenizer, eos_ids: set[int], device: torch.device) -> None:
        p = req.sampling
        self.uid = next(_uids)  # unique for the engine's lifetime (id() values are reused)
        self.req = req
        self.handle = handle
        self.params = p
        self.tokens = list(req.prompt_token_ids)
        self.prompt_len = len(self.tokens)
        self.generated: list[int] = []
        self.detok = IncrementalDetokenizer(tokenizer, self.tokens, p.stop, p.include_stop_str_in_output,
                                            p.skip_special_tokens)
        self.generator = make_generator(p.seed, device)
        self.apps = apps
        self.metrics = RequestMetrics(arrival_time=time.monotonic())
        self.eos_ids = set() if p.ignore_eos else set(eos_ids)
        self.banned_until_min = sorted(self.eos_ids | set(p.stop_token_ids)) if p.min_tokens > 0 else []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None

    @property
    def length(self) -> int:
        return len(self.tokens)


_WAKE = object()
_uids = itertools.count()


class Engine:
    """Continuous batching with per-request steering over one loaded model."""

    def __init__(self, lm: LoadedModel, config: EngineConfig | None = None) -> None:
        self.lm = lm
        self.config = config or EngineConfig()
        cfg = self.config
        if cfg.max_batch_size < 1 or cfg.max_queue_size < 1:
            raise ValueError("max_batch_size and max_queue_size must be >= 1")
        self.max_model_len = min(cfg.max_model_len or min(lm.max_model_len, 8192), lm.max_model_len)
        self.model = lm.model
        self.base = lm.model.base_model
        self.lm_head = lm.model.get_output_embeddings()
        self._masks = AttentionMasks(lm)
        self.vocab_size = int(self.lm_head.weight.shape[0])
        self.pad_id = lm.pad_id
        self.hooks = SteeringHooks(lm.layers)
        self.cache = (
            SlotKVCache(lm.num_layers, cfg.max_batch_size, self.max_model_len, cfg.kv_initial_capacity)
            if cfg.use_kv_cache else None
        )
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._jobs: deque[_Job] = deque()
        self._num_jobs = 0  # accepted jobs not yet ended
        self._pending = 0  # accepted, not yet running (inbox + waiting)
        self._lock = threading.Lock()
        self._stop = False
        self._dead: BaseException | None = None
        self._decode_steer: tuple[tuple[int, ...], SteeringBatch | None, StepSteering | None] | None = None
        self._thread = threading.Thread(target=self._run, name="steerserve-engine", daemon=True)

    # -- public API ----------------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.hooks.remove()

    def __enter__(self) -> "Engine":
        return self.start() if not self._thread.is_alive() else self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return self._pending

    def validate(self, request: GenerationRequest) -> list[ResolvedApplication]:
        """Check a request against the model; return its steering resolved to device tensors."""
        ids = request.prompt_token_ids
        if not ids:
            raise RequestValidationError("the prompt is empty", param="prompt")
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in ids):
            raise RequestValidationError(f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")
        sp = request.sampling
        sp.validate(self.vocab_size)
        total = len(ids) + sp.max_tokens
        if total > self.max_model_len:
            raise RequestValidationError(
                f"this model's maximum context length is {self.max_model_len} tokens; the request needs {total} "
                f"({len(ids)} in the prompt, {sp.max_tokens} for the completion)", param="max_tokens",
            )
        if request.steering is None:
            return []
        request.steering.validate(self.lm.hidden_size, self.lm.num_layers)
        return resolve(request.steering, self.lm.device, self.lm.dtype)

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Validate and enqueue a request. With ``loop`` the handle is iterated with ``async for``.

        Raises RequestValidationError / SteeringValidationError for a bad request, QueueFullError when the
        waiting queue is full, EngineClosedError when the engine is not running.
        """
        if not self.is_alive():
            raise EngineClosedError("the engine is not running")
        apps = self.validate(request)
        handle = RequestHandle(request, self, loop)
        seq = _Sequence(request, handle, apps, self.lm.tokenizer, self.lm.eos_token_ids, self.lm.device)
        handle.metrics = seq.metrics
        with self._lock:
            if self._pending >= self.config.max_queue_size:
                raise QueueFullError(
                    f"the waiting queue is full ({self.config.max_queue_size} requests); retry later"
                )
            self._pending += 1
        self._inbox.put(seq)
        return handle

    @property
    def num_jobs(self) -> int:
        return self._num_jobs

    def submit_job(self, work: Work, name: str = "job",
                   loop: asyncio.AbstractEventLoop | None = None) -> JobHandle:
        """Queue a background job (see :mod:`steering.jobs`); it runs in chunks between generation steps.

        Raises QueueFullError when ``max_jobs`` jobs are already queued or running, EngineClosedError when the
        engine is not running. With ``loop``, await the handle's ``aresult()``.
        """
        if not self.is_alive():
            raise EngineClosedError("the engine is not running")
        with self._lock:
            if self._num_jobs >= self.config.max_jobs:
                raise QueueFullError(f"too many background jobs ({self.config.max_jobs}); retry later")
            self._num_jobs += 1
        handle = JobHandle(name, loop, on_cancel=self._wake)
        self._inbox.put(_Job(work, handle))
        return handle

    def generate(self, prompt_token_ids: list[int], sampling: SamplingParams | None = None,
                 steering: SteeringSpec | None = None) -> GenerationResult:
        """Submit one request and wait for it (a convenience for scripts and tests)."""
        req = GenerationRequest(list(prompt_token_ids), sampling or SamplingParams(), steering)
        return self.submit(req).result()

    # -- inference thread ---------------------------------------------------------------------------------------
    def _wake(self) -> None:
        self._inbox.put(_WAKE)

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stop:
                    self._pull(block=not self._running and not self._waiting and not self._jobs)
                    if self._stop:
                        break
                    self._reap_cancelled()
                    if self.cache is not None:
                        self._admit_with_cache()
                        if self._running:
                            self._decode_step()
                    else:
                        self._admit_without_cache()
                        if self._running:
                            self._full_step()
                    if self._jobs:
                        self._job_step()
        except BaseException as exc:  # noqa: BLE001 - the thread must not die silently
            log.exception("engine thread died")
            self._dead = exc
        finally:
            self._fail_all(EngineClosedError("the engine stopped"))

    def _pull(self, block: bool) -> None:
        try:
            item = self._inbox.get(block=block)
            while True:
                if isinstance(item, _Job):
                    self._jobs.append(item)
                elif item is not _WAKE:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _fail_all(self, exc: Exception) -> None:
        self._pull(block=False)
        for seq in list(self._running) + list(self._waiting):
            self._finish(seq, "error", error=exc)
        self._running.clear()
        self._waiting.clear()
        for job in self._jobs:
            close(job, exc)
        self._jobs.clear()
        with self._lock:
            self._num_jobs = 0

    def _reap_cancelled(self) -> None:
        kept = deque()
        for seq in self._waiting:
            if seq.handle.cancelled:
                with self._lock:
                    self._pending -= 1
                self._finish(seq, "abort")
            else:
                kept.append(seq)
        self._waiting = kept
        gone = [i for i, s in enumerate(self._running) if s.handle.cancelled]
        for i in gone:
            self._finish(self._running[i], "abort")
        self._remove_rows(gone)

    def _job_step(self) -> None:
        """Advance the job at the head of the queue by one chunk; it then goes to the back (round robin)."""
        job = self._jobs.popleft()
        if advance(job, self.lm, self.hooks, self.config.job_chunk_tokens):
            with self._lock:
                self._num_jobs -= 1
        else:
            self._jobs.append(job)

    def _take_waiting(self, limit_rows: int, token_budget: int | None) -> list[_Sequence]:
        batch: list[_Sequence] = []
        longest = 0
        while self._waiting and len(batch) < limit_rows:
            nxt = self._waiting[0]
            new_longest = max(longest, nxt.length)
            if batch and token_budget is not None and new_longest * (len(batch) + 1) > token_budget:
                break
            batch.append(self._waiting.popleft())
            longest = new_longest
        if batch:
            now = time.monotonic()
            with self._lock:
                self._pending -= len(batch)
            for seq in batch:
                seq.metrics.scheduled_time = now
        return batch

    # -- forward helpers ----------------------------------------------------------------------------------------
    def _steering_for(self, seqs: Sequence[_Sequence]) -> SteeringBatch | None:
        if not any(s.apps for s in seqs):
            return None
        return SteeringBatch([s.apps for s in seqs], self.lm.hidden_size, self.lm.device, self.lm.dtype)

    def _mask(self, q_pos: torch.Tensor, kv_len: int):
        """Additive attention mask [n, 1, Q, kv_len] for queries at absolute positions ``q_pos`` [n, Q] over
        keys at positions 0..kv_len-1 (causal, and windowed where the model uses sliding windows)."""
        k = torch.arange(kv_len, device=q_pos.device).expand(q_pos.shape[0], kv_len)
        return self._masks(k.unsqueeze(1) <= q_pos.unsqueeze(-1), q_pos, k)

    def _full_forward(self, seqs: Sequence[_Sequence], use_cache: bool) -> torch.Tensor:
        """Forward whole sequences (prefill or cache-free step); return last-position logits [n, vocab]."""
        dev = self.lm.device
        n, T = len(seqs), max(s.length for s in seqs)
        ids = torch.full((n, T), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : s.length] = torch.tensor(s.tokens)
        ids = ids.to(dev)
        pos = torch.arange(T, device=dev).expand(n, T)
        lens = torch.tensor([s.length for s in seqs], device=dev)
        steer = self._steering_for(seqs)
        step = steer.gates(pos, torch.tensor([s.prompt_len for s in seqs], device=dev)) if steer else None
        with self.hooks.active(step):
            out = self.base(
                input_ids=ids, position_ids=pos, attention_mask=self._mask(pos, T),
                past_key_values=self.cache if use_cache else None, use_cache=use_cache,
            )
        hidden = out.last_hidden_state[torch.arange(n, device=dev), lens - 1]
        return self.lm.logits(hidden)

    # -- scheduling ---------------------------------------------------------------------------------------------
    def _admit_with_cache(self) -> None:
        free = self.config.max_batch_size - len(self._running)
        if free <= 0 or not self._waiting:
            return
        batch = self._take_waiting(free, self.config.max_prefill_tokens)
        if not batch:
            return
        start = len(self._running)
        try:
            self.cache.plan_prefill(start, len(batch), max(s.length for s in batch))
            logits = self._full_forward(batch, use_cache=True)
        except Exception as exc:  # noqa: BLE001
            log.exception("prefill failed")
            for seq in batch:
                self._finish(seq, "error", error=RequestFailedError(f"prefill failed: {exc}"))
            return
        finally:
            self.cache.clear_plan()
        self._running.extend(batch)
        self._sample_and_emit(list(range(start, start + len(batch))), logits)

    def _admit_without_cache(self) -> None:
        free = self.config.max_batch_size - len(self._running)
        if free > 0 and self._waiting:
            self._running.extend(self._take_waiting(free, None))

    def _decode_step(self) -> None:
        dev = self.lm.device
        seqs = self._running
        n = len(seqs)
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=dev)
        pos = torch.tensor([s.length - 1 for s in seqs], device=dev)
        try:
            self.cache.plan_decode(pos)
            mask = self._mask(pos.unsqueeze(1), self.cache._kv_len)
            step = self._decode_steering(seqs, pos)
            with self.hooks.active(step):
                out = self.base(input_ids=ids, position_ids=pos.unsqueeze(1), attention_mask=mask,
                                past_key_values=self.cache, use_cache=True)
            logits = self.lm.logits(out.last_hidden_state[:, -1])
        except Exception as exc:  # noqa: BLE001
            log.exception("decode step failed")
            self._fail_rows(list(range(n)), exc)
            return
        finally:
            self.cache.clear_plan()
        self._sample_and_emit(list(range(n)), logits)

    def _decode_steering(self, seqs: Sequence[_Sequence], pos: torch.Tensor) -> StepSteering | None:
        key = tuple(s.uid for s in seqs)
        cached = self._decode_steer
        if cached is None or cached[0] != key:
            cached = (key, self._steering_for(seqs), None)
        _, steer, step = cached
        if steer is None:
            self._decode_steer = cached
            return None
        if step is None or not steer.position_free:
            plens = torch.tensor([s.prompt_len for s in seqs], device=pos.device)
            step = steer.gates(pos.unsqueeze(1), plens)
        # In decode every row is past its prompt, so phase-only gates stay valid while the batch is unchanged.
        self._decode_steer = (key, steer, step if steer.position_free else None)
        return step

    def _full_step(self) -> None:
        n = len(self._running)
        try:
            logits = self._full_forward(self._running, use_cache=False)
        except Exception as exc:  # noqa: BLE001
            log.exception("step failed")
            self._fail_rows(list(range(n)), exc)
            return
        self._sample_and_emit(list(range(n)), logits)

    def _fail_rows(self, rows: list[int], exc: Exception) -> None:
        for i in rows:
            self._finish(self._running[i], "error", error=RequestFailedError(f"generation failed: {exc}"))
        self._remove_rows(rows)

    def _remove_rows(self, rows: list[int]) -> None:
        """Drop rows from the running batch, keeping it compact (the last row moves into each hole)."""
        for i in sorted(rows, reverse=True):
            last = len(self._running) - 1
            if i != last:
                moved = self._running[last]
                if self.cache is not None:
                    self.cache.move_slot(last, i, min(moved.length, self.cache.capacity))
                self._running[i] = moved
            self._running.pop()

    # -- sampling and outputs -----------------------------------------------------------------------------------
    def _sample_and_emit(self, rows: list[int], logits: torch.Tensor) -> None:
        seqs = [self._running[i] for i in rows]
        samp = [
            RowSampling(s.params, s.generated, s.generator,
                        s.banned_until_min if len(s.generated) < s.params.min_tokens else [])
            for s in seqs
        ]
        results = sample(logits, samp)
        now = time.monotonic()
        done: list[int] = []
        for row, seq, res in zip(rows, seqs, results):
            if isinstance(res, Exception):
                self._finish(seq, "error", error=RequestFailedError(f"sampling failed: {res}"))
                done.append(row)
                continue
            tok, lp = res
            self._append(seq, tok, lp, now)
            if seq.finish_reason is not None:
                done.append(row)
        self._remove_rows(done)

    def _append(self, seq: _Sequence, tok: int, lp: TokenLogprob | None, now: float) -> None:
        seq.tokens.append(tok)
        seq.generated.append(tok)
        n_gen = len(seq.generated)
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
        seq.metrics.last_token_time = now
        p = seq.params
        past_min = n_gen >= p.min_tokens
        if tok in seq.eos_ids and past_min:
            seq.finish_reason = "stop"
        elif tok in p.stop_token_ids and past_min:
            seq.finish_reason, seq.stop_reason = "stop", tok
        else:
            seq.detok.add(tok, check_stop=past_min)
            if seq.detok.stopped_by is not None:
                seq.finish_reason, seq.stop_reason = "stop", seq.detok.stopped_by
            elif n_gen >= p.max_tokens or seq.length >= self.max_model_len:
                seq.finish_reason = "length"
        finished = seq.finish_reason is not None
        out = RequestOutput(
            request_id=seq.req.request_id, token_ids=[tok], text=seq.detok.take(final=finished),
            logprobs=[lp] if lp is not None else [], num_prompt_tokens=seq.prompt_len,
            num_generated_tokens=n_gen, finished=finished, finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason, time=now,
        )
        if finished:
            seq.metrics.finished_time = now
            out.metrics = seq.metrics
        seq.handle._push(out)

    def _finish(self, seq: _Sequence, reason: str, error: Exception | None = None) -> None:
        """End a sequence that did not finish through a token (abort, error)."""
        seq.finish_reason = reason
        seq.metrics.finished_time = time.monotonic()
        seq.handle._push(RequestOutput(
            request_id=seq.req.request_id, token_ids=[], text=seq.detok.take(final=True), logprobs=[],
            num_prompt_tokens=seq.prompt_len, num_generated_tokens=len(seq.generated), finished=True,
            finish_reason=reason, error=error, metrics=seq.metrics, time=seq.metrics.finished_time,
        ))


