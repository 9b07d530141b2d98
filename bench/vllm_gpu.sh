#!/usr/bin/env bash
# The vLLM backend benchmark on a GPU: bf16, a random-weight model with Llama-3-8B's shape, CUDA graphs and
# torch.compile on (the dense steering op), against stock vLLM and the HF backend under the same load.
# usage: bench/vllm_gpu.sh [WORKDIR [bench/vllm_backend.py options]]     (needs: pip install -e ".[vllm]" on a CUDA machine, ~20 GB of GPU memory)
# The model is built locally from a config (nothing is downloaded); its tokenizer is the default model's.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-${TMPDIR:-/tmp}/steerserve-gpu-bench}
[[ $# -gt 0 ]] && shift
MODEL="$WORK/llama3-8b-random"
mkdir -p "$WORK"
python - "$MODEL" <<'PY'
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from steering.backends.hf.loading import resolve_model_dir

out = Path(sys.argv[1])
if (out / "config.json").exists():
    sys.exit(0)
default_dir, _ = resolve_model_dir(None, None)  # the embedded default model, converted: its tokenizer
from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained(default_dir)
cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=len(tok), max_position_embeddings=8192, rope_theta=500000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])
torch.manual_seed(0)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
model.save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)
print(f"built {out} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters)")
PY
# CUDA graphs on (no --eager): the backend picks the graph-capturable dense op.
python bench/vllm_backend.py --model "$MODEL" --dtype bfloat16 --requests 16 --tokens 128 --repeats 3 "$@"
