"""Server settings from flags and ``STEERSERVE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from steering.registry import DEFAULT_VECTOR_DIR


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STEERSERVE_", extra="forbid")

    model: str | None = Field(None, description="HF model directory or .gguf file; default: embedded SmolLM2")
    served_model_name: str | None = Field(None, description="name clients use; default: the model's name")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: str = "auto"
    dtype: str = "auto"
    cache_dir: Path | None = None
    max_batch_size: int = Field(16, ge=1)
    max_queue_size: int = Field(256, ge=1)
    max_model_len: int | None = Field(None, ge=16)
    vector_dir: Path = Field(DEFAULT_VECTOR_DIR)
    api_key: str | None = None
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    retry_after_seconds: int = Field(1, ge=0)
    log_level: str = "info"
    max_jobs: int = Field(64, ge=1, description="background jobs (attributions...) queued or running")
    job_chunk_tokens: int = Field(2048, ge=16, description="tokens per job chunk: generation waits at most one")
    build_max_examples: int = Field(10_000, ge=1, description="examples in one vector build")
    build_max_sweep_rows: int = Field(200_000, ge=1, description="(layers x scales + 1) x validation examples")
    eval_max_prompts: int = Field(1024, ge=1, description="prompts in one steering-effect evaluation")
    eval_max_scored_rows: int = Field(200_000, ge=1, description="conditions x questions in one TruthfulQA "
                                                                 "evaluation")
    keep_finished_jobs: int = Field(256, ge=1, description="finished jobs kept for GET /v1/jobs/{id}")
    attribution_max_input_tokens: int = Field(1024, ge=1)
    attribution_max_target_tokens: int = Field(128, ge=1)
    attribution_max_n_steps: int = Field(512, ge=1)
    attribution_max_probes: int = Field(64, ge=1)
    attribution_max_probe_steps: int = Field(1000, ge=1)
