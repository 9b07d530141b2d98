from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from steering.backends.hf import EngineConfig, HFEngine
from steering.backends.hf.loading import load_model
from tests.tiny import build_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def fresh_score_cache(monkeypatch):
    """Every test starts with an empty process attribution-score cache: scores an earlier test left there would
    let a build skip the very work (and progress) a test is about."""
    from steering.tasks.attribution import cache

    monkeypatch.setattr(cache, "SCORES", cache.ScoreCache())


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


@pytest.fixture(scope="session")
def lm64(tiny_dir):
    """The tiny model in float64 (its RMSNorms still compute in float32)."""
    return load_model(str(tiny_dir), device="cpu", dtype="float64")


@pytest.fixture(scope="session")
def texts(tiny_lm):
    """A prompt and two continuations of it, as token ids."""
    inputs = tiny_lm.inputs
    return (inputs.encode_text("The quick brown fox jumps over"), inputs.encode_continuation(" the lazy dog"),
            inputs.encode_continuation(" a happy cat"))


@pytest.fixture(scope="session")
def sentiment_vector(tiny_lm):
    """A CAA vector built from :data:`tests.tiny.SENTIMENT`, named ``pos``."""
    from dataclasses import replace

    from steering.tasks.builders import BuildRequest, build
    from tests.tiny import SENTIMENT

    return replace(build(tiny_lm, BuildRequest(SENTIMENT, "caa")).vector, name="pos")


@pytest.fixture(scope="module")
def engine(tiny_lm):
    """A started engine on the tiny model, shared by a module's tests."""
    eng = HFEngine(tiny_lm, EngineConfig(max_batch_size=8, max_queue_size=64)).start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    """A live server on the module's engine: (url, app)."""
    from tests.live import live_server

    with live_server(engine, vector_dir=tmp_path_factory.mktemp("vectors")) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    """The official OpenAI SDK pointed at the module's server."""
    import openai

    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model_name(tiny_lm):
    return tiny_lm.name


@pytest.fixture(scope="session")
def vlm(tmp_path_factory):
    """``vlm(family)``: a tiny random vision-language model of that family (:func:`tests.tiny.build_vlm`), loaded
    once per session."""
    from tests.tiny import build_vlm

    loaded: dict[str, object] = {}

    def _get(family: str = "llava"):
        if family not in loaded:
            path = build_vlm(tmp_path_factory.mktemp(f"tiny-{family}"), family)
            loaded[family] = load_model(str(path), device="cpu", dtype="float32")
        return loaded[family]

    return _get


@pytest.fixture(scope="session")
def images():
    """``images(seed, size)``: a random image as a checked LoadedImage."""
    from steering.multimodal import ImageLimits, load_image
    from tests.tiny import data_url, random_image

    def _get(seed: int = 0, size: tuple[int, int] = (40, 30)):
        return load_image(data_url(random_image(seed, size)), ImageLimits())

    return _get


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
"""Debian's Chromium as root, headless, on a machine with no network but loopback."""


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium driven by Playwright (never ``playwright install``); skips without them, fails under
    ``STEERSERVE_REQUIRE_BROWSER=1``."""
    from tests.tools import BROWSER, missing, tool

    chromium = tool("chromium", BROWSER, "Debian package chromium", "/usr/bin/chromium")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        missing("needs playwright (pip install -e '.[test]')", BROWSER)
    expect.set_options(timeout=60_000)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()
