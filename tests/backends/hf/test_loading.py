"""Model loading and decoder-layer discovery across architectures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from steering.backends.hf import HFEngine
from steering.backends.hf.layers import find_decoder_layers
from steering.backends.hf.loading import load_model, resolve_device, resolve_dtype
from steering.errors import ModelLoadError
from steering.sampling import SamplingParams
from steering.spec import SteeringSpec
from steering.vectors import SteeringVector
from tests.tiny import build_model


@pytest.mark.parametrize("arch,layers_attr", [("llama", "model.layers"), ("qwen2", "model.layers"),
                                              ("qwen2-sliding", "model.layers"), ("mistral", "model.layers"),
                                              ("gpt2", "transformer.h")])
def test_architectures_load_find_layers_and_steer(tmp_path, arch, layers_attr):
    lm = load_model(str(build_model(tmp_path / arch, arch, layers=3)), device="cpu", dtype="float32")
    obj = lm.model
    for part in layers_attr.split("."):
        obj = getattr(obj, part)
    assert lm.layers is obj and lm.num_layers == 3 and lm.hidden_size == 64
    # longer than the 8-token sliding window of the windowed variants, prompt and generation both
    ids = lm.tokenizer("The quick brown fox jumps over the lazy dog. Hello world!")["input_ids"]
    with HFEngine(lm).start() as engine:
        sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        ref = lm.model.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                pad_token_id=lm.tokenizer.pad_token_id)[0, len(ids):].tolist()
        plain = engine.generate(ids, sp)
        assert plain.token_ids == ref
        vec = SteeringVector({i: torch.randn(64, generator=torch.Generator().manual_seed(i)) for i in range(3)})
        steered = engine.generate(ids, sp, SteeringSpec.single(vec, scale=20.0))
        assert steered.token_ids != plain.token_ids


def test_layers_not_found_is_a_clear_error():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])

    with pytest.raises(ModelLoadError, match="cannot find the decoder layers of Odd"):
        find_decoder_layers(Odd())


def test_missing_model_and_bad_settings():
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("/nonexistent/model")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda")


def test_gguf_tokenizer_flags_are_honoured(tmp_path, tiny_tokenizer):
    """transformers' GGUF conversion drops ``tokenizer.ggml.add_bos_token`` (Gemma's GGUFs set it: without BOS the
    model reads garbage); the conversion reads it back and applies it to the tokenizer it saves."""
    import gguf

    from steering.backends.hf.loading import apply_tokenizer_flags, gguf_tokenizer_flags

    path = tmp_path / "flags.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_bool("tokenizer.ggml.add_eos_token", False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    flags = gguf_tokenizer_flags(path)
    assert flags == {"add_bos_token": True, "add_eos_token": False}
    tok = tiny_tokenizer
    before = tok("a b")["input_ids"]
    saved = (getattr(tok, "add_bos_token", None), getattr(tok, "add_eos_token", None))
    try:
        apply_tokenizer_flags(tok, flags)
        ids = tok("a b")["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[1:] == [t for t in before if t != tok.bos_token_id]
        assert tok("a b", add_special_tokens=False)["input_ids"][0] != tok.bos_token_id
    finally:
        for attr, value in zip(("add_bos_token", "add_eos_token"), saved):
            if value is not None:
                setattr(tok, attr, value)
