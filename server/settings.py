"""Server settings from ``STEERSERVE_*`` environment variables (and ``steerserve serve`` flags, which are
generated from this model, so every setting has a flag)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from steering.store import DEFAULT_VECTOR_DIR


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STEERSERVE_", extra="forbid")

    model: str | None = Field(None, description="HF model directory or .gguf file; default: the embedded "
                                                "SmolLM2-135M-Instruct")
    served_model_name: str | None = Field(None, description="name clients send; default: the model's name")
    backend: Literal["hf"] = Field("hf", description="generation backend: hf (transformers, with analysis jobs)")
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
    api_key: str | None = Field(None, description="require 'Authorization: Bearer KEY' on /v1 and the tokenizer")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    retry_after_seconds: int = Field(1, ge=0, description="Retry-After on 503 when the queue is full")
    log_level: str = Field("info", description="log level (uvicorn's too)")
    drain_seconds: float = Field(30.0, ge=0, description="on shutdown, wait this long for running work")
    max_jobs: int = Field(64, ge=1, description="background jobs (attributions, builds...) queued or running")
    job_chunk_tokens: int = Field(2048, ge=16, description="tokens per job chunk: generation waits at most one")
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
