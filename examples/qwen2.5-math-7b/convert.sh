#!/usr/bin/env bash
# One-off, on one node of the cluster inside the container (CPU is enough; ~15 min for 7B):
# HF Qwen2.5-Math-7B → a Megatron-Core distributed checkpoint the trainer loads (model.load).
# A distributed checkpoint is layout-independent: written once, it loads at TP 4 here, or any TP/PP.
set -euo pipefail
HF=${HF:-/models/Qwen2.5-Math-7B}
HF32K=${HF32K:-/models/Qwen2.5-Math-7B-32k}
OUT=${OUT:-/ckpt/qwen2.5-math-7b-mcore}

# The released model has max_position_embeddings 4096; the recipe generates 10240 tokens after a
# prompt of up to 2048, so (as the DAPO and HAPO authors did) the context is raised to 32768 with
# rope_theta unchanged. The trainer and vLLM read model.hf_path's config.json.
mkdir -p "$HF32K"
cp -n "$HF"/*.json "$HF"/*.safetensors "$HF32K"/ 2>/dev/null || true
python - "$HF32K/config.json" <<'PY'
import json, sys
path = sys.argv[1]
cfg = json.load(open(path))
cfg["max_position_embeddings"] = 32768
json.dump(cfg, open(path, "w"), indent=2)
print(f"{path}: max_position_embeddings = 32768")
PY

megatron-hapo convert hf-to-megatron --hf "$HF32K" --out "$OUT" --dtype bf16 --target-tp 4 --target-pp 1 --verify
