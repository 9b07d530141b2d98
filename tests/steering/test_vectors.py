"""Steering vectors as files."""

from __future__ import annotations

import torch

from steering.vectors import SteeringVector


def test_vector_roundtrip_is_atomic(tmp_path):
    vec = SteeringVector({0: torch.randn(8), 3: torch.randn(8)}, name="v", metadata={"method": "test"})
    path = tmp_path / "v.safetensors"
    vec.save(path)
    back = SteeringVector.load(path)
    assert back.name == "v" and back.metadata == {"method": "test"} and back.layers == [0, 3]
    torch.testing.assert_close(back.values[3], vec.values[3])
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]  # no temporary files left
