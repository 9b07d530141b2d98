from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from steering.backends.hf import EngineConfig, HFEngine
from steering.backends.hf.loading import load_model
from tests.tiny import build_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """The tiny models' tokenizer alone (no model), for the fake backend."""
    from tests.tiny import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture
def make_fake(tiny_tokenizer):
    """Start fake backends (:mod:`tests.fakes`); each is shut down afterwards."""
    from tests.fakes import FakeBackend

    made = []

    def _make(cls=FakeBackend, **kw):
        backend = cls(tiny_tokenizer, **kw).start()
        made.append(backend)
        return backend

    yield _make
    for backend in made:
        backend.shutdown()
