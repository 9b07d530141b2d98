"""Which models the plugin steers, and that it refuses loudly what it cannot: another decoder layer, another vLLM."""

from __future__ import annotations

import pytest
import torch

from steering.engine.types import GenerationRequest
from steering.errors import ModelLoadError
from steering.sampling import SamplingParams
from steering.spec import SteeringApplication, SteeringSpec
from steering.vectors import SteeringVector
from tests.backends.vllm.conftest import ENGINE, env
from tests.tiny import build_model

pytestmark = pytest.mark.vllm

PROMPT = [5 + (j * 13) % 300 for j in range(40)]


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_more_families_steer_like_the_hf_backend(arch, tmp_path, vllm_cache):
    from steering.backends.hf import EngineConfig, HFEngine, load_model
    from steering.backends.vllm.engine import VLLMBackend, VLLMConfig

    model = build_model(tmp_path / arch, arch, layers=3, hidden=128)
    g = torch.Generator().manual_seed(0)
    spec = SteeringSpec([SteeringApplication(SteeringVector({1: torch.randn(128, generator=g)}), 8.0,
                                             positions="generated", normalize=True)])
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    with HFEngine(load_model(str(model), device="cpu", dtype="float32"), EngineConfig()).start() as hf:
        want = [hf.generate(PROMPT, sp).token_ids, hf.generate(PROMPT, sp, spec).token_ids]
    assert want[0] != want[1]
    with env(VLLM_CACHE_ROOT=str(vllm_cache / arch)):
        backend = VLLMBackend(VLLMConfig(model=str(model), enforce_eager=True, **ENGINE)).start()
    try:
        got = [backend.submit(GenerationRequest(PROMPT, sp, s)).result().token_ids for s in (None, spec)]
    finally:
        backend.shutdown()
    assert got == want


def test_a_model_whose_layers_it_cannot_steer_fails_at_start(tmp_path, vllm_cache):
    from steering.backends.vllm.engine import VLLMBackend, VLLMConfig

    model = build_model(tmp_path / "gpt2", "gpt2", layers=2, hidden=128)
    with env(VLLM_CACHE_ROOT=str(vllm_cache / "gpt2")), pytest.raises(ModelLoadError, match="cannot be steered"):
        VLLMBackend(VLLMConfig(model=str(model), enforce_eager=True, **ENGINE)).start()


def test_another_vllm_release_is_refused(monkeypatch, vllm_model):
    import vllm

    from steering.backends.vllm import seams
    from steering.backends.vllm.engine import VLLMBackend, VLLMConfig

    seams.check_seams()  # the installed release passes
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(seams.SeamError, match="supports vLLM 0.32.0 exactly"):
        seams.check_seams()
    with pytest.raises(ModelLoadError, match="0.32.0 exactly"):
        VLLMBackend(VLLMConfig(model=str(vllm_model))).start()
