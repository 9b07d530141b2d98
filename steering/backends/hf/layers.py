"""Find a causal LM's decoder layers from its module structure."""

from __future__ import annotations

from torch import nn

from steering.errors import ModelLoadError

# Attribute paths of the decoder-layer ModuleList, by architecture family.
LAYER_PATHS: tuple[str, ...] = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, SmolLM
    "model.language_model.layers",  # multimodal wrappers (Gemma 3, LLaVA-style)
    "language_model.model.layers",
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
)


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the ModuleList of decoder layers of ``model``.

    Known paths are tried first; otherwise the longest ModuleList of identical blocks whose length equals
    ``config.num_hidden_layers`` is taken. Raises ModelLoadError with what was tried when nothing fits.
    """
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for path in LAYER_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            if expected is None or len(found) == expected:
                return found
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList)
        and len(mod) > 1
        and len({type(m) for m in mod}) == 1
        and (expected is None or len(mod) == expected)
    ]
    if candidates:
        return max(candidates, key=lambda nm: len(nm[1]))[1]
    raise ModelLoadError(
        f"cannot find the decoder layers of {type(model).__name__}: none of {', '.join(LAYER_PATHS)} is a "
        f"ModuleList of {expected if expected is not None else 'the'} decoder blocks, and no other ModuleList of "
        "identical blocks matches config.num_hidden_layers. steerserve supports Llama, Mistral, Qwen2, Gemma and "
        "GPT-2 style decoder-only models."
    )
