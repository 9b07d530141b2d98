"""The Hugging Face backend: models loaded with transformers, steered through hooks on their decoder layers,
served by a continuous-batching engine that also runs analysis jobs (it has gradients)."""

from steering.backends.hf.engine import EngineConfig, HFEngine
from steering.backends.hf.jobs import run_job
from steering.backends.hf.loading import LoadedModel, load_model, resolve_model_dir
from steering.backends.hf.runner import ModelRunner

__all__ = ["EngineConfig", "HFEngine", "LoadedModel", "ModelRunner", "load_model", "resolve_model_dir", "run_job"]
