"""llama.cpp control-vector GGUF import/export (steering/gguf_vectors.py). Fast: no model needed."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from steering.errors import SteeringValidationError
from steering.gguf_vectors import export_controlvector, import_controlvector
from steering.vectors import SteeringVector

HIDDEN = 8


def _vector(layers=(1, 5, 31), name="happy") -> SteeringVector:
    gen = torch.Generator().manual_seed(0)
    return SteeringVector(values={layer: torch.randn(HIDDEN, generator=gen) for layer in layers}, name=name)


def _write_raw(path, tensors: dict[str, np.ndarray], arch="controlvector", model_hint="llama", layer_count=None):
    """Write a file the way repeng's ControlVector.export_gguf does."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string(f"{arch}.model_hint", model_hint)
    writer.add_uint32(f"{arch}.layer_count", len(tensors) if layer_count is None else layer_count)
    for name, arr in tensors.items():
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _kv(reader, key):
    field = reader.get_field(key)
    part = field.parts[field.data[0]]
    return bytes(part).decode() if field.types[0] == gguf.GGUFValueType.STRING else part.tolist()[0]


def test_round_trip_keeps_layers_and_values(tmp_path):
    vec = _vector(layers=(1, 2, 17, 63))
    path = tmp_path / "v.gguf"
    export_controlvector(vec, path, model_hint="llama")
    back = import_controlvector(path, num_layers=64, hidden_size=HIDDEN)
    assert back.layers == [1, 2, 17, 63]
    for layer in vec.layers:
        assert back.values[layer].dtype == torch.float32
        assert torch.equal(back.values[layer], vec.values[layer])
    assert back.name == "happy"
    assert back.metadata == {"source": "gguf", "gguf": {"model_hint": "llama", "layer_count": 4}}


def test_file_on_disk_is_what_llama_cpp_expects(tmp_path):
    path = tmp_path / "v.gguf"
    export_controlvector(_vector(layers=(31, 1, 5)), path, model_hint="mistral")
    reader = gguf.GGUFReader(str(path))
    assert _kv(reader, "general.architecture") == "controlvector"
    assert _kv(reader, "controlvector.model_hint") == "mistral"
    assert _kv(reader, "controlvector.layer_count") == 3
    assert [t.name for t in reader.tensors] == ["direction.1", "direction.5", "direction.31"]
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert [int(d) for d in t.shape] == [HIDDEN]
    # no temporary files left next to the target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.gguf"]


def test_scale_is_applied(tmp_path):
    vec = _vector()
    path = tmp_path / "v.gguf"
    export_controlvector(vec, path, model_hint="llama", scale=-2.5)
    back = import_controlvector(path)
    for layer in vec.layers:
        assert torch.allclose(back.values[layer], vec.values[layer] * -2.5)


def test_repeng_style_file_maps_direction_n_to_layer_n(tmp_path):
    # repeng's default layers are n-1..1 (hidden_layers=range(-1, -n, -1)), key = 0-based decoder layer index.
    n = 6
    dirs = {layer: np.full(HIDDEN, float(layer), dtype=np.float32) for layer in range(n - 1, 0, -1)}
    path = tmp_path / "repeng.gguf"
    _write_raw(path, {f"direction.{layer}": d for layer, d in dirs.items()}, model_hint="qwen2")
    back = import_controlvector(path, num_layers=n, hidden_size=HIDDEN)
    assert back.layers == [1, 2, 3, 4, 5]
    for layer in back.layers:
        assert torch.equal(back.values[layer], torch.full((HIDDEN,), float(layer)))
    assert back.metadata["gguf"] == {"model_hint": "qwen2", "layer_count": 5}
    assert back.name == "repeng"


def test_float16_tensors_are_converted(tmp_path):
    arr = np.linspace(-1, 1, HIDDEN).astype(np.float16)
    path = tmp_path / "half.gguf"
    _write_raw(path, {"direction.3": arr})
    back = import_controlvector(path)
    assert back.values[3].dtype == torch.float32
    assert torch.equal(back.values[3], torch.from_numpy(arr.astype(np.float32)))


def test_layer_zero_is_refused_both_ways(tmp_path):
    with pytest.raises(SteeringValidationError, match="direction.0"):
        export_controlvector(_vector(layers=(0, 1)), tmp_path / "a.gguf", model_hint="llama")
    assert not (tmp_path / "a.gguf").exists()
    _write_raw(tmp_path / "b.gguf", {"direction.0": np.ones(HIDDEN, dtype=np.float32)})
    with pytest.raises(SteeringValidationError, match="direction.0"):
        import_controlvector(tmp_path / "b.gguf")


def test_export_empty_vector_is_refused(tmp_path):
    with pytest.raises(SteeringValidationError, match="empty"):
        export_controlvector(SteeringVector(values={}), tmp_path / "e.gguf", model_hint="llama")
    assert not (tmp_path / "e.gguf").exists()


def test_wrong_architecture(tmp_path):
    path = tmp_path / "model.gguf"
    _write_raw(path, {"direction.1": np.ones(HIDDEN, dtype=np.float32)}, arch="llama")
    with pytest.raises(SteeringValidationError, match="architecture is 'llama'") as info:
        import_controlvector(path)
    assert str(path) in info.value.message


def test_unexpected_tensor_name(tmp_path):
    path = tmp_path / "x.gguf"
    _write_raw(path, {"blk.1.weight": np.ones(HIDDEN, dtype=np.float32)})
    with pytest.raises(SteeringValidationError, match="unexpected tensor 'blk.1.weight'"):
        import_controlvector(path)


def test_mismatched_tensor_sizes(tmp_path):
    path = tmp_path / "x.gguf"
    _write_raw(path, {"direction.1": np.ones(HIDDEN, dtype=np.float32),
                      "direction.2": np.ones(HIDDEN + 1, dtype=np.float32)})
    with pytest.raises(SteeringValidationError, match="different sizes"):
        import_controlvector(path)


def test_two_dimensional_tensor_is_rejected(tmp_path):
    path = tmp_path / "x.gguf"
    _write_raw(path, {"direction.1": np.ones((2, HIDDEN), dtype=np.float32)})
    with pytest.raises(SteeringValidationError, match="1-D"):
        import_controlvector(path)


def test_layer_out_of_range(tmp_path):
    path = tmp_path / "x.gguf"
    export_controlvector(_vector(layers=(1, 30)), path, model_hint="llama")
    import_controlvector(path, num_layers=31)
    message = r"layers \[30\] do not exist; the model has layers 0..29"
    with pytest.raises(SteeringValidationError, match=message) as info:
        import_controlvector(path, num_layers=30)
    assert info.value.param == "layers"


def test_hidden_size_mismatch(tmp_path):
    path = tmp_path / "x.gguf"
    export_controlvector(_vector(), path, model_hint="llama")
    with pytest.raises(SteeringValidationError, match=f"size {HIDDEN}, but the model's hidden size is 16"):
        import_controlvector(path, hidden_size=16)


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all" * 4, b"GGUF\x03\x00\x00\x00"])
def test_non_gguf_file(tmp_path, content):
    path = tmp_path / "junk.gguf"
    path.write_bytes(content)
    with pytest.raises(SteeringValidationError, match="junk.gguf"):
        import_controlvector(path)


def test_missing_file(tmp_path):
    with pytest.raises(SteeringValidationError, match="cannot read"):
        import_controlvector(tmp_path / "absent.gguf")


def test_failed_export_leaves_existing_file_untouched(tmp_path, monkeypatch):
    path = tmp_path / "v.gguf"
    export_controlvector(_vector(layers=(1,)), path, model_hint="llama")
    before = path.read_bytes()

    def boom(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_controlvector(_vector(layers=(2, 3)), path, model_hint="llama")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.gguf"]
