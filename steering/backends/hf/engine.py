"""The Hugging Face backend's continuous-batching engine: one inference thread owns the model; callers submit
from anywhere. It implements both capabilities of the contract (:mod:`steering.engine.base`): generation and
analysis jobs.

Each loop iteration of the inference thread (a *step*):

1. takes in new requests and jobs, and drops cancelled requests (their slot is freed at once);
2. admits waiting requests into free slots and prefills them together, giving each its first token;
3. runs one decode forward for every running sequence, each row with its own position, steering and
   sampling, and hands each request its new token;
4. removes finished sequences, then advances one chunk of one job.

A request that arrives while others decode therefore joins the running batch at the next step. The pieces
have their own rooms: :mod:`.scheduler` (queues and admission), :mod:`.runner` (every forward, with its masks,
KV cache and steering), :mod:`.outputs` (per-request state and the deltas it emits), :mod:`.sampler`.
Positions are absolute, so steering by position gives the same result with and without the KV cache
(``use_kv_cache=False`` recomputes every sequence each step).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace
from typing import TypeVar

import torch

from steering.backends.grammar import GrammarCompiler
from steering.backends.hf.hooks import StepTelemetry
from steering.backends.hf.jobs import JobRun
from steering.backends.hf.kv_cache import SlotKVCache
from steering.backends.hf.loading import LoadedModel
from steering.backends.hf.outputs import Sequence
from steering.backends.hf.prompt_logprobs import prompt_logprobs
from steering.backends.hf.runner import ModelRunner
from steering.backends.hf.sampler import RowSampling, sample
from steering.backends.hf.scheduler import Scheduler
from steering.engine.base import AnalysisBackend, GenerationBackend
from steering.engine.handles import JobHandle, RequestHandle
from steering.engine.jobs import Work
from steering.engine.types import EngineStats, GenerationRequest, ModelInfo
from steering.errors import EngineClosedError, RequestFailedError, SteeringOverflowError
from steering.inputs import Inputs
from steering.limits import RequestLimits
from steering.sampling import StructuredOutput
from steering.store import VectorStore

log = logging.getLogger(__name__)
T = TypeVar("T")


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
    background_share: float = 0.5
    """Of the batch slots, the most that background requests (priority above 0, such as an evaluation's
    generations) may hold."""


class HFEngine(GenerationBackend, AnalysisBackend):
    """Continuous batching with per-request steering over one Hugging Face model, plus chunked jobs."""

    kind = "hf"

    def __init__(self, lm: LoadedModel, config: EngineConfig | None = None,
                 vectors: VectorStore | None = None, limits: RequestLimits | None = None) -> None:
        self.lm = lm
        self.config = cfg = config or EngineConfig()
        if cfg.max_batch_size < 1 or cfg.max_queue_size < 1:
            raise ValueError("max_batch_size and max_queue_size must be >= 1")
        self.max_model_len = min(cfg.max_model_len or min(lm.max_model_len, 8192), lm.max_model_len)
        self.vectors = vectors
        self.limits = limits or RequestLimits()
        self._info = replace(lm.info, max_model_len=self.max_model_len)
        cache = (SlotKVCache(lm.num_layers, cfg.max_batch_size, self.max_model_len, cfg.kv_initial_capacity)
                 if cfg.use_kv_cache else None)
        self.runner = ModelRunner(lm, cache)
        self.scheduler = Scheduler(cfg.max_batch_size, cfg.max_queue_size, cfg.max_jobs,
                                   int(cfg.background_share * cfg.max_batch_size))
        self.grammars = GrammarCompiler(lm.tokenizer, lm.vocab_size, lm.eos_token_ids)
        """Structured outputs' grammars, compiled for this model's tokenizer (cached per spec)."""
        self._stop = False
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="steerserve-engine", daemon=True)

    # -- the contract -------------------------------------------------------------------------------------------
    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def inputs(self) -> Inputs:
        return self.lm.inputs

    def start(self) -> HFEngine:
        if not self._thread.is_alive():
            self._thread.start()
        return self

    def prepare_structured(self, spec: StructuredOutput) -> None:
        """Compile ``spec``'s grammar now (it is cached for ``submit``); raise InvalidRequestError
        (``param="response_format"``) if it is not valid. Blocking: a server calls it off its event loop."""
        self.grammars.check(spec)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self.scheduler.wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.runner.close()

    def alive(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    def stats(self) -> EngineStats:
        s, cfg = self.scheduler, self.config
        return EngineStats(running=len(s.running), waiting=s.num_waiting, jobs=s.num_jobs,
                           max_running=cfg.max_batch_size, max_waiting=cfg.max_queue_size)

    def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.stats().idle and self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        self._check_open()
        resolved = self.check_request(request)
        spec = request.sampling.structured
        matcher = self.grammars.matcher(spec) if spec is not None else None
        apps = self.runner.device_steering(resolved.applications) if resolved is not None else []
        handle = RequestHandle(request, loop, on_cancel=self.scheduler.wake, steering=resolved)
        seq = Sequence(request, handle, apps, self.lm.tokenizer, self.lm.eos_token_ids, self.lm.device, matcher)
        self.scheduler.add_request(seq)
        return handle

    def submit_job(self, work: Work[T], name: str = "job",
                   loop: asyncio.AbstractEventLoop | None = None) -> JobHandle[T]:
        self._check_open()
        handle: JobHandle[T] = JobHandle(name, loop, on_cancel=self.scheduler.wake)
        self.scheduler.add_job(JobRun(work, handle))
        return handle

    def _check_open(self) -> None:
        if not self.alive():
            raise EngineClosedError("the engine is not running")

    # -- inference thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        s = self.scheduler
        try:
            with torch.inference_mode():
                while not self._stop:
                    s.pull(block=s.idle)
                    if self._stop:
                        break
                    self._reap_cancelled()
                    if self.runner.cache is not None:
                        self._prefill()
                        if s.running:
                            self._decode()
                    else:
                        s.running.extend(s.admit(None))
                        if s.running:
                            self._full_step()
                    if s.jobs:
                        self._job_step()
        except BaseException as exc:  # noqa: BLE001 - the thread must not die silently
            log.exception("engine thread died")
            self._dead = exc
        finally:
            seqs, jobs = s.drain_all()
            closed = EngineClosedError("the engine stopped")
            for seq in seqs:
                seq.finish("error", error=closed)
            for job in jobs:
                job.close(closed)

    def _reap_cancelled(self) -> None:
        gone, rows = self.scheduler.take_cancelled()
        for seq in gone:
            seq.finish("abort")
        for i in rows:
            self.scheduler.running[i].finish("abort")
        self._remove_rows(rows)

    def _job_step(self) -> None:
        """Advance the job at the head of the queue by one chunk; it then goes to the back (round robin)."""
        s = self.scheduler
        job = s.next_job()
        if job.advance(self.runner, self.config.job_chunk_tokens):
            s.job_ended()
        else:
            s.requeue_job(job)

    def _whole(self, seqs: Seq[Sequence], prefill: bool) -> torch.Tensor:
        """Forward whole sequences (prefill, or a cache-free step); return last-position logits [n, vocab].
        Rows that ask for prompt log-probabilities get them here, from the same (steered) forward."""
        dev = self.lm.device
        n, length = len(seqs), max(s.length for s in seqs)
        ids = torch.full((n, length), self.lm.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : s.length] = torch.tensor(s.tokens)
        pos = torch.arange(length, device=dev).expand(n, length)
        keep = self.runner.causal(pos, length)
        embeds = rope = None
        images = self.runner.images
        if images is not None and any(s.req.images for s in seqs):
            rows = [s.req.images for s in seqs]
            embeds = images.embed(ids.to(dev), rows)
            keep = images.keep(keep, rows)
            rope, deltas = images.rope(pos, [(s.req.prompt_token_ids, s.req.images) for s in seqs])
            for s, delta in zip(seqs, deltas, strict=True):
                s.rope_delta = delta
        # measured with the KV cache only: without it every step recomputes (and would recount) whole sequences
        tel = self._telemetry(seqs, pos < torch.tensor([s.length for s in seqs], device=dev).unsqueeze(1)) \
            if prefill else None
        out = self.runner.forward(
            input_ids=None if embeds is not None else ids.to(dev), inputs_embeds=embeds, positions=pos,
            prompt_lens=torch.tensor([s.prompt_len for s in seqs], device=dev), keep=keep,
            steering=[s.apps for s in seqs], kv="prefill" if prefill else None,
            slot_start=len(self.scheduler.running), rope_positions=rope, telemetry=tel)
        self._measured(seqs, tel)
        hidden = out.last_hidden_state
        for i, s in enumerate(seqs):
            if s.wants_prompt_logprobs:
                assert s.params.prompt_logprobs is not None
                s.prompt_logprobs = prompt_logprobs(self.lm, hidden[i], s.req.prompt_token_ids,
                                                    s.params.prompt_logprobs)
        last = torch.tensor([s.length - 1 for s in seqs], device=dev)
        return self.lm.logits(hidden[torch.arange(n, device=dev), last])

    def _telemetry(self, seqs: Seq[Sequence], valid: torch.Tensor | None = None) -> StepTelemetry | None:
        """Accumulators for a forward's steering measures, when a row is steered."""
        if not any(s.apps for s in seqs):
            return None
        return StepTelemetry(len(seqs), self.lm.num_layers, self.lm.device, valid)

    @staticmethod
    def _measured(seqs: Seq[Sequence], tel: StepTelemetry | None) -> None:
        if tel is not None:
            for seq, (change, tokens) in zip(seqs, tel.rows(), strict=True):
                seq.measured(change, tokens)

    def _prefill(self) -> None:
        s = self.scheduler
        if len(s.running) >= self.config.max_batch_size or not s.waiting:
            return
        batch = s.admit(self.config.max_prefill_tokens)
        if not batch:
            return
        start = len(s.running)
        try:
            logits = self._whole(batch, prefill=True)
        except Exception as exc:  # noqa: BLE001 - find the request that failed; the others go on
            if len(batch) == 1:
                log.exception("prefill failed")
                batch[0].finish("error", error=RequestFailedError(f"prefill failed: {exc}"))
                return
            log.warning("prefill of %d requests failed (%s); prefilling them one at a time", len(batch), exc)
            for seq in batch:
                self._prefill_alone(seq)
            return
        s.running.extend(batch)
        self._sample_and_emit(list(range(start, start + len(batch))), logits)

    def _prefill_alone(self, seq: Sequence) -> None:
        running = self.scheduler.running
        try:
            logits = self._whole([seq], prefill=True)
        except Exception as exc:  # noqa: BLE001
            log.exception("prefill failed")
            seq.finish("error", error=RequestFailedError(f"prefill failed: {exc}"))
            return
        running.append(seq)
        self._sample_and_emit([len(running) - 1], logits)

    def _decode(self) -> None:
        dev = self.lm.device
        seqs = self.scheduler.running
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=dev)
        pos = torch.tensor([[s.length - 1] for s in seqs], device=dev)
        images = self.runner.images
        rope = images.later_rope(pos, [s.rope_delta for s in seqs]) if images is not None else None
        try:
            tel = self._telemetry(seqs)
            out = self.runner.forward(
                input_ids=ids, positions=pos, prompt_lens=torch.tensor([s.prompt_len for s in seqs], device=dev),
                steering=[s.apps for s in seqs], steering_key=tuple(s.uid for s in seqs), kv="decode",
                rope_positions=rope, telemetry=tel)
            self._measured(seqs, tel)
            logits = self.lm.logits(out.last_hidden_state[:, -1])
        except Exception as exc:  # noqa: BLE001
            log.exception("decode step failed")
            self._fail_rows(list(range(len(seqs))), exc)
            return
        self._sample_and_emit(list(range(len(seqs))), logits)

    def _full_step(self) -> None:
        n = len(self.scheduler.running)
        try:
            logits = self._whole(self.scheduler.running, prefill=False)
        except Exception as exc:  # noqa: BLE001
            log.exception("step failed")
            self._fail_rows(list(range(n)), exc)
            return
        self._sample_and_emit(list(range(n)), logits)

    def _fail_rows(self, rows: list[int], exc: Exception) -> None:
        for i in rows:
            self.scheduler.running[i].finish("error", error=RequestFailedError(f"generation failed: {exc}"))
        self._remove_rows(rows)

    def _remove_rows(self, rows: list[int]) -> None:
        """Drop rows from the running batch, keeping it compact (the last row moves into each hole)."""
        running, cache = self.scheduler.running, self.runner.cache
        for i in sorted(rows, reverse=True):
            last = len(running) - 1
            if i != last:
                moved = running[last]
                if cache is not None:
                    cache.move_slot(last, i, min(moved.length, cache.capacity))
                running[i] = moved
            running.pop()

    def _sample_and_emit(self, rows: list[int], logits: torch.Tensor) -> None:
        seqs = [self.scheduler.running[i] for i in rows]
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        done: list[int] = []
        if not all(finite):  # a row's steering overflowed: that row fails alone, the others sample as usual
            for row, seq, ok in zip(rows, seqs, finite, strict=True):
                if not ok:
                    seq.finish("error", error=SteeringOverflowError(
                        "the steering drove this request's hidden states to Inf/NaN; use a smaller scale",
                        param="steering"))
                    if self.runner.cache is not None:
                        self.runner.cache.clear_slot(row)
                    done.append(row)
            keep = [i for i, ok in enumerate(finite) if ok]
            rows, seqs, logits = [rows[i] for i in keep], [seqs[i] for i in keep], logits[keep]
        scoring = [i for i, s in enumerate(seqs) if s.params.max_tokens == 0]
        if scoring:  # prompt scoring only: prefilled, nothing to generate
            for i in scoring:
                seqs[i].finish("length")
                done.append(rows[i])
            keep = [i for i in range(len(seqs)) if seqs[i].params.max_tokens]
            rows, seqs, logits = [rows[i] for i in keep], [seqs[i] for i in keep], logits[keep]
        results = sample(logits, self._row_sampling(seqs, logits)) if seqs else []
        now = time.monotonic()
        for row, seq, res in zip(rows, seqs, results, strict=True):
            if isinstance(res, Exception):
                seq.finish("error", error=RequestFailedError(f"sampling failed: {res}"))
                done.append(row)
                continue
            tok, lp = res
            seq.append(tok, lp, now, self.max_model_len)
            if seq.finish_reason is not None:
                done.append(row)
        self._remove_rows(done)


    def _row_sampling(self, seqs: Seq[Sequence], logits: torch.Tensor) -> list[RowSampling]:
        """Each row's sampling state, with the masks of structured rows' grammars (filled together)."""
        rows = [s.sampling() for s in seqs]
        constrained = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if constrained:
            vocab = logits.shape[-1]
            try:
                masks = self.grammars.allowed([seqs[i].matcher for i in constrained], vocab, logits.device)
            except Exception:  # noqa: BLE001 - llguidance misused: those rows fail (nothing allowed), not the step
                log.exception("computing the grammar masks failed")
                masks = torch.zeros(len(constrained), vocab, dtype=torch.bool, device=logits.device)
            for k, i in enumerate(constrained):
                rows[i].allowed = masks[k]
        return rows
