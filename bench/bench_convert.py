"""Checkpoint conversion throughput against a plain read + write of the same bytes.

    .venv/bin/python bench/bench_convert.py [--layers 30]

A randomly initialised Llama with SmolLM-135M's shape (fp32, built in code) is saved as a HF
folder; then, in this process: a plain read + write of its safetensors bytes (the I/O floor),
HF → Megatron distributed checkpoint, Megatron → HF. Seconds and GB/s of model bytes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30)
    args = p.parse_args()
    import torch
    import transformers

    from megatron_hapo.models.convert import hf_to_megatron_checkpoint, megatron_to_hf_checkpoint

    cfg = transformers.AutoConfig.for_model(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    work = tempfile.mkdtemp(prefix="bench_convert_")
    src = os.path.join(work, "hf")
    model.save_pretrained(src)
    nbytes = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors"))

    def plain():
        dst = os.path.join(work, "copy")
        os.makedirs(dst, exist_ok=True)
        for f in os.listdir(src):
            with open(os.path.join(src, f), "rb") as fi:
                data = fi.read()
            with open(os.path.join(dst, f), "wb") as fo:
                fo.write(data)
                fo.flush()
                os.fsync(fo.fileno())
        shutil.rmtree(dst)

    rows = []
    t0 = time.perf_counter()
    plain()
    rows.append(("plain read + write of the safetensors bytes", time.perf_counter() - t0))
    t0 = time.perf_counter()
    meg = hf_to_megatron_checkpoint(src, os.path.join(work, "meg"), progress=False)
    rows.append(("HF → Megatron distributed checkpoint", time.perf_counter() - t0))
    t0 = time.perf_counter()
    megatron_to_hf_checkpoint(meg, os.path.join(work, "back"), progress=False)
    rows.append(("Megatron → HF (safetensors)", time.perf_counter() - t0))
    shutil.rmtree(work)
    print(f"model: Llama {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, fp32, {nbytes / 1e6:.0f} MB; "
          f"{os.cpu_count()} CPU cores, local disk")
    print("| path | seconds | GB/s | vs plain read+write |")
    print("|---|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.2f} | {nbytes / t / 1e9:.2f} | {t / rows[0][1]:.1f}x |")


if __name__ == "__main__":
    main()
