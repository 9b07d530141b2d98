"""Import and export llama.cpp ``controlvector`` GGUF files (``--control-vector``, repeng's ``export_gguf``).

Format and layer convention, established from the sources:

* Loader: ggml-org/llama.cpp ``common/common.cpp``, ``common_control_vector_load_one``. It reads every tensor,
  parses the name ``direction.<N>`` (anything else fails the file), rejects ``N == 0`` ("invalid (zero)
  direction tensor layer index"), requires type F32 (``GGML_TYPE_F32``) and one dimension (``ggml_n_dims == 1``),
  and requires every tensor to have the same element count (n_embd). It stores ``direction.N`` at
  ``data[n_embd * (N - 1)]`` ("layer 1 at [0]"), multiplied by the user's strength, summing duplicates. It
  reads no KV metadata at all.
* ``src/llama-adapter.cpp``: ``llama_adapter_cvec::apply`` copies ``data + n_embd * (il - 1)`` into
  ``tensors[il]`` for ``il`` in ``1..n_layer-1`` ("there's never a tensor for layer 0" in ``init``);
  ``tensor_for(il)`` returns it when ``layer_start <= il <= layer_end`` (``common_init_from_params`` defaults
  the range to 1..n_layer) and ``apply_to`` does ``ggml_add(cur, tensors[il])``.
* Graph: ``src/llama-graph.cpp`` ``llm_graph_context::build_cvec(cur, il)`` calls ``cvec->apply_to``; each model
  (e.g. ``src/models/llama.cpp``) calls it in ``for (il = 0; il < n_layer; ++il)`` right after the block's final
  residual add, as ``l_out``. So ``direction.N`` is added to the OUTPUT of decoder block N (0-based), at every
  position, and block 0's output can never be steered.
* Writers: vgel/repeng ``repeng/extract.py`` ``ControlVector.export_gguf`` uses ``gguf.GGUFWriter(path,
  "controlvector")`` (so ``general.architecture = "controlvector"``), ``controlvector.model_hint`` (string, the
  HF ``model_type``), ``controlvector.layer_count`` (uint32, the number of directions) and ``direction.{layer}``
  tensors, where ``layer`` is the key of ``directions``; ``read_representations``/``batched_get_hiddens`` fill
  key ``layer`` from ``hidden_states[layer + 1]`` (the output of decoder layer ``layer``) and default to layers
  n-1..1, and ``repeng/control.py`` adds ``directions[layer]`` to the output of ``model_layer_list(model)[layer]``.
  llama.cpp's own ``tools/cvector-generator`` ``export_gguf`` writes the same three keys (layer_count as int32).

Conclusion: our ``values[layer]`` (added to the output of 0-based decoder layer ``layer``) is ``direction.<layer>``
with no offset. Layer 0 has no llama.cpp equivalent: export refuses it and import rejects ``direction.0``. Tensors
are 1-D float32 of the hidden size. ``general.architecture`` is written and required on import here (llama.cpp
itself does not check it); ``controlvector.model_hint`` and ``controlvector.layer_count`` are written and are
optional on import. Float16 tensors (not loadable by llama.cpp) are accepted on import and converted to float32.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from steering.errors import SteeringValidationError
from steering.files import atomic_write
from steering.vectors import SteeringVector

ARCH = "controlvector"
_NAME = re.compile(r"direction\.(0|[1-9][0-9]*)")


def export_controlvector(vector: SteeringVector, path: str | os.PathLike, *, model_hint: str,
                         scale: float = 1.0) -> None:
    """Write ``vector * scale`` as a llama.cpp control vector: ``values[layer]`` becomes ``direction.<layer>``."""
    import gguf

    if not vector.values:
        raise SteeringValidationError("cannot export an empty steering vector (it has no layers)", param="layers")
    if not math.isfinite(scale):
        raise SteeringValidationError(f"scale must be a finite number, got {scale!r}", param="scale")
    arrays: dict[int, np.ndarray] = {}
    for layer, vec in sorted(vector.values.items()):
        if not isinstance(layer, int) or layer < 1:
            raise SteeringValidationError(
                f"layer {layer!r} cannot be exported: llama.cpp control vectors steer layers 1 and up "
                "(it rejects direction.0; the output of decoder layer 0 is never steered)", param="layers")
        arr = (vec.detach().to("cpu", torch.float32) * scale).numpy()
        if arr.ndim != 1 or not np.isfinite(arr).all():
            raise SteeringValidationError(f"layer {layer}: expected a finite 1-D vector, got shape {arr.shape}",
                                          param="values")
        arrays[layer] = arr
    sizes = {a.shape[0] for a in arrays.values()}
    if len(sizes) != 1:
        raise SteeringValidationError(f"all layers must have the same size, got sizes {sorted(sizes)}", param="values")

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, ARCH)
        try:
            if vector.name:
                writer.add_name(vector.name)
            writer.add_string(f"{ARCH}.model_hint", model_hint)
            writer.add_uint32(f"{ARCH}.layer_count", len(arrays))
            for layer, arr in arrays.items():
                writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(arr, dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    atomic_write(path, write)


def export_for_llama_cpp(vector: SteeringVector, path: str | os.PathLike, scale: float = 1.0) -> list[int]:
    """The export policy: write ``vector`` for llama.cpp with layer 0 left out (llama.cpp cannot steer it) and
    the model hint taken from the vector's recorded model (else ``llama``); return the layers left out."""
    kept = {layer: v for layer, v in vector.values.items() if layer > 0}
    if not kept:
        raise SteeringValidationError("the vector has only layer 0, which llama.cpp control vectors cannot hold",
                                      param="layers")
    model = vector.metadata.get("model")
    hint = model.get("model_type") if isinstance(model, dict) else None
    export_controlvector(SteeringVector(kept, name=vector.name), path,
                         model_hint=hint if isinstance(hint, str) and hint else "llama", scale=scale)
    return sorted(set(vector.values) - set(kept))


def _kv(reader, key: str):
    """A scalar KV value (str or number), or None when the key is absent."""
    import gguf

    field = reader.get_field(key)
    if field is None or not field.data:
        return None
    part = field.parts[field.data[0]]
    if field.types and field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    return part.tolist()[0] if len(part) == 1 else None


def import_controlvector(path: str | os.PathLike, *, num_layers: int | None = None,
                         hidden_size: int | None = None) -> SteeringVector:
    """Read a llama.cpp control vector; ``direction.<N>`` becomes ``values[N]`` (float32)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except OSError as exc:
        raise SteeringValidationError(f"{path}: cannot read control vector file: {exc}", param="path") from exc
    except Exception as exc:  # the reader raises assorted errors on malformed input
        raise SteeringValidationError(f"{path}: not a valid GGUF file ({exc})", param="path") from exc
    arch = _kv(reader, "general.architecture")
    if arch != ARCH:
        raise SteeringValidationError(
            f"{path}: general.architecture is {arch!r}, expected {ARCH!r} (not a control vector file)", param="path")
    if not reader.tensors:
        raise SteeringValidationError(f"{path}: contains no direction tensors", param="path")
    values: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        match = _NAME.fullmatch(t.name)
        if match is None:
            raise SteeringValidationError(f"{path}: unexpected tensor {t.name!r}; expected 'direction.<layer>'",
                                          param="path")
        layer = int(match.group(1))
        if layer == 0:
            raise SteeringValidationError(f"{path}: direction.0 is invalid (llama.cpp never steers layer 0)",
                                          param="layers")
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            raise SteeringValidationError(f"{path}: {t.name} has type {t.tensor_type.name}; expected F32 or F16",
                                          param="values")
        if any(int(d) != 1 for d in t.shape[1:]):
            raise SteeringValidationError(f"{path}: {t.name} has shape {tuple(int(d) for d in t.shape)}; "
                                          "expected a 1-D vector", param="values")
        values[layer] = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1))
    sizes = sorted({v.shape[0] for v in values.values()})
    if len(sizes) != 1:
        raise SteeringValidationError(f"{path}: direction tensors have different sizes {sizes}", param="values")
    if hidden_size is not None and sizes[0] != hidden_size:
        raise SteeringValidationError(
            f"{path}: vectors have size {sizes[0]}, but the model's hidden size is {hidden_size}", param="values")
    if num_layers is not None:
        bad = [layer for layer in sorted(values) if layer >= num_layers]
        if bad:
            raise SteeringValidationError(
                f"{path}: layers {bad} do not exist; the model has layers 0..{num_layers - 1}", param="layers")
    meta = {"model_hint": _kv(reader, f"{ARCH}.model_hint"), "layer_count": _kv(reader, f"{ARCH}.layer_count")}
    return SteeringVector(values=values, name=_kv(reader, "general.name") or Path(path).stem,
                          metadata={"source": "gguf", "gguf": meta})


def read_vector_file(data: bytes, label: str = "the uploaded file") -> SteeringVector:
    """A vector from a file's bytes: a steerserve safetensors file, or a llama.cpp control-vector GGUF (told
    apart by the GGUF magic). Any parse failure is a SteeringValidationError naming ``label``."""
    import tempfile

    is_gguf = data[:4] == b"GGUF"
    with tempfile.NamedTemporaryFile(suffix=".gguf" if is_gguf else ".safetensors") as fh:
        fh.write(data)
        fh.flush()
        try:
            return import_controlvector(fh.name) if is_gguf else SteeringVector.load(fh.name)
        except SteeringValidationError as exc:
            raise SteeringValidationError(exc.message.replace(fh.name, label), param="file") from None
        except Exception as exc:  # noqa: BLE001 - any parse failure is the client's file
            raise SteeringValidationError(f"not a valid safetensors or GGUF steering vector: {exc}",
                                          param="file") from None
