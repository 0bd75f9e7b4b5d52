#!/usr/bin/env bash
# One-off, on one node inside the container (CPU is enough; ~1 h and ~130 GB of host memory for 30B):
# HF Qwen3-30B-A3B → a Megatron-Core distributed checkpoint the trainer loads (model.load) at any
# TP/EP that divides the model; --target-* only check the layout; --verify compares logits.
set -euo pipefail
HF=${HF:-/models/Qwen3-30B-A3B-Base}
OUT=${OUT:-/ckpt/qwen3-30b-a3b-mcore}
megatron-hapo convert hf-to-megatron --hf "$HF" --out "$OUT" --dtype bf16 --target-tp 2 --target-pp 1 \
    --target-ep 8 --target-etp 1 --verify
