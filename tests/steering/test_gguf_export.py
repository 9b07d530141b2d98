"""A built vector exported for llama.cpp and imported back."""

from __future__ import annotations

import pytest
import torch

from steering.errors import SteeringValidationError
from steering.tasks.builders import BuildRequest, build
from tests.tiny import EXAMPLES


def test_gguf_export_of_a_built_vector_round_trips(tiny_lm, tmp_path):
    from steering.gguf_vectors import export_controlvector, import_controlvector

    vec = build(tiny_lm, BuildRequest(EXAMPLES, "caa", {"layers": [1, 2, 3]})).vector
    export_controlvector(vec, tmp_path / "v.gguf", model_hint="llama")
    back = import_controlvector(tmp_path / "v.gguf", num_layers=tiny_lm.num_layers, hidden_size=tiny_lm.hidden_size)
    assert back.layers == [1, 2, 3]
    for layer in back.layers:
        torch.testing.assert_close(back.values[layer], vec.values[layer])
    with pytest.raises(SteeringValidationError):
        import_controlvector(tmp_path / "v.gguf", num_layers=2)
