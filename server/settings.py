"""Server settings from ``STEERSERVE_*`` environment variables (and ``steerserve serve`` flags, which are
generated from this model, so every setting has a flag)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.auth import APIKey
from steering.limits import RequestLimits
from steering.multimodal import DEFAULT_FORMATS, ImageLimits
from steering.store import DEFAULT_VECTOR_DIR


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STEERSERVE_", extra="forbid")

    model: str | None = Field(None, description="HF model directory or .gguf file; default: the embedded "
                                                "SmolLM2-135M-Instruct")
    served_model_name: str | None = Field(None, description="name clients send; default: the model's name")
    backend: Literal["hf", "vllm"] = Field("hf", description="generation backend: hf (transformers, runs analysis "
                                                               "jobs itself) or vllm (needs the vllm extra)")
    analysis: Literal["start", "lazy", "off"] = Field(
        "lazy", description="with a backend that runs no analysis jobs (vllm): load the Hugging Face engine that "
                            "runs them (attribution, vector builds, evaluations) at start, on first use (503 until "
                            "loaded), or never (501); off also disables them with the hf backend")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="port")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: str = Field("auto", description="auto (bf16/fp16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    cache_dir: Path | None = Field(None, description="where converted GGUF models are kept; default "
                                                     "~/.cache/steerserve")
    max_batch_size: int = Field(16, ge=1, description="sequences decoded together")
    max_queue_size: int = Field(256, ge=1, description="requests waiting for a slot before 503")
    max_model_len: int | None = Field(None, ge=16, description="longest prompt + completion; default: the "
                                                               "model's, at most 8192")
    vector_dir: Path = Field(DEFAULT_VECTOR_DIR, description="directory of the steering-vector store")
    api_key: str | None = Field(None, description="an admin key: then every API call needs "
                                                  "'Authorization: Bearer <key>'")
    api_keys: list[APIKey] = Field(default_factory=list, description='keys with roles, as JSON: [{"key": "...", '
                                   '"role": "read|generate|admin", "name": "..."}]')
    api_keys_file: Path | None = Field(None, description="a JSON file with the same list of keys (e.g. a secret)")
    metrics_require_key: bool = Field(False, description="/metrics needs a key (read role) too")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    max_prompt_chars: int = Field(1_000_000, ge=1, description="prompt characters one request may send")
    max_stop_strings: int = Field(16, ge=0, description="stop strings one request may give")
    max_stop_chars: int = Field(256, ge=1, description="characters of one stop string")
    max_images: int = Field(8, ge=0, description="images one request may send (vision-language models)")
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1, description="encoded bytes of one image")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="width x height of one image")
    image_formats: list[str] = Field(default_factory=lambda: sorted(DEFAULT_FORMATS),
                                     description="image formats accepted (Pillow's names)")
    image_dirs: list[Path] = Field(default_factory=list, description="directories whose image files requests may "
                                                                     "name (file: URLs or paths); default: none, "
                                                                     "only data: URLs")
    retry_after_seconds: int = Field(1, ge=0, description="Retry-After on 503 when the queue is full")
    log_level: str = Field("info", description="log level (uvicorn's too)")
    header_timeout_seconds: float = Field(10.0, gt=0, description="a connection must send its request headers "
                                                                   "within this")
    body_timeout_seconds: float = Field(60.0, gt=0, description="a request body must arrive within this (408)")
    keep_alive_seconds: int = Field(5, ge=1, description="idle keep-alive connections close after this")
    max_connections: int = Field(1024, ge=1, description="connections and requests served at once (beyond: 503)")
    drain_seconds: float = Field(30.0, ge=0, description="on SIGTERM, wait at most this long for running work "
                                                         "before stopping it")
    shutdown_delay_seconds: float = Field(2.0, ge=0, description="on SIGTERM, keep listening (with /ready 503) at "
                                                                 "least this long")
    max_jobs: int = Field(64, ge=1, description="background jobs (attributions, builds...) queued or running")
    job_chunk_tokens: int = Field(2048, ge=16, description="tokens per job chunk: generation waits at most one")
    background_share: float = Field(0.5, gt=0, le=1, description="most of the batch that background generations "
                                                                  "(evaluations) may hold")
    build_max_examples: int = Field(10_000, ge=1, description="examples in one vector build")
    build_max_sweep_rows: int = Field(200_000, ge=1, description="(layers x scales + 1) x validation examples")
    eval_max_prompts: int = Field(1024, ge=1, description="prompts in one steering-effect evaluation")
    eval_max_scored_rows: int = Field(200_000, ge=1, description="conditions x questions in one TruthfulQA "
                                                                 "evaluation")
    keep_finished_jobs: int = Field(256, ge=1, description="finished jobs kept for GET /v1/jobs/{id}")
    attribution_max_input_tokens: int = Field(1024, ge=1, description="prompt tokens one attribution explains")
    attribution_max_target_tokens: int = Field(128, ge=1, description="target tokens one attribution explains")
    attribution_max_n_steps: int = Field(512, ge=1, description="integration steps of one attribution")
    attribution_max_probes: int = Field(64, ge=1, description="ReAGent probes of one attribution")
    attribution_max_probe_steps: int = Field(1000, ge=1, description="ReAGent steps of one attribution")
    vllm_enforce_eager: bool = Field(False, description="vllm: no torch.compile or CUDA graphs (the reference)")
    vllm_enable_prefix_caching: bool = Field(True, description="vllm: prefix caching (salted by steering)")
    vllm_max_num_batched_tokens: int | None = Field(None, ge=16, description="vllm: tokens per step (chunked "
                                                                             "prefill budget); default: vLLM's")
    vllm_block_size: int | None = Field(None, ge=1, description="vllm: KV block size; default: vLLM's")
    vllm_gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vllm: share of GPU memory vLLM takes "
                                                                             "(leave room for the analysis model)")
    vllm_kv_cache_gib: int | None = Field(None, ge=1, description="vllm on CPU: GiB of KV cache")
    vllm_tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per model (tensor parallel)")
    vllm_max_vectors_per_request: int = Field(4, ge=1, le=16, description="vllm: steering vectors one request "
                                                                          "may apply")
    vllm_bank_mib: float = Field(64.0, gt=0, description="vllm: memory of the workers' vector bank (MiB)")
    vllm_telemetry_every: int = Field(8, ge=0, description="vllm: measure the steering's relative change on every "
                                                           "n-th steered step in the workers (0: never)")
    vllm_engine_args: dict[str, Any] = Field(default_factory=dict, description="vllm: further engine arguments, as "
                                                                              "JSON (vLLM's names)")


def request_limits(settings: ServerSettings) -> RequestLimits:
    """The bounds on one request's work, from the settings."""
    images = ImageLimits(max_images=settings.max_images, max_bytes=settings.max_image_bytes,
                         max_pixels=settings.max_image_pixels,
                         formats=frozenset(f.upper() for f in settings.image_formats),
                         allowed_dirs=tuple(settings.image_dirs))
    return RequestLimits(max_prompt_chars=settings.max_prompt_chars, max_stop_strings=settings.max_stop_strings,
                         max_stop_chars=settings.max_stop_chars, images=images)
