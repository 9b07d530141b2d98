from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from tiny import build_model  # noqa: E402

from steering.backends.hf import EngineConfig, HFEngine  # noqa: E402
from steering.backends.hf.loading import load_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_lm(tiny_dir):
    return load_model(str(tiny_dir), device="cpu", dtype="float32")


@pytest.fixture
def make_engine(tiny_lm):
    """Start engines on the tiny model; every engine is shut down (and its hooks removed) afterwards."""
    engines: list[HFEngine] = []

    def _make(lm=None, **cfg) -> HFEngine:
        eng = HFEngine(lm or tiny_lm, EngineConfig(**cfg)).start()
        engines.append(eng)
        return eng

    yield _make
    for eng in engines:
        eng.shutdown()


@pytest.fixture(scope="session")
def real_lm():
    """The embedded default model (SmolLM2-135M-Instruct); converted once into the cache."""
    return load_model(None, device="cpu", dtype="float32")
