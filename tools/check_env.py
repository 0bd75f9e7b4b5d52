"""Checks a node or a cluster before a run: library versions, devices, and one collective.

    python tools/check_env.py                                   # one process
    torchrun --nnodes N --nproc-per-node 8 ... tools/check_env.py   # every rank, NCCL on GPU

Rank 0 prints the stack (torch, CUDA, megatron-core, Transformer Engine, apex, vLLM); every rank
all-reduces its rank id and checks the sum, so a broken fabric fails here and not mid-training.
"""
from __future__ import annotations

import importlib
import os
import sys


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name, module in (("torch", "torch"), ("megatron-core", "megatron.core"), ("transformer-engine", "transformer_engine"),
                         ("apex", "apex"), ("vllm", "vllm"), ("transformers", "transformers"), ("sentencepiece", "sentencepiece")):
        try:
            mod = importlib.import_module(module)
            out[name] = getattr(mod, "__version__", "installed")
        except Exception as exc:  # absent or broken: say which
            out[name] = f"unavailable ({type(exc).__name__})"
    import torch

    out["cuda"] = torch.version.cuda or "none (CPU build)"
    out["devices"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return out


def main() -> int:
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        for k, v in versions().items():
            print(f"{k:>20}: {v}")
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        device = torch.device("cuda") if backend == "nccl" else torch.device("cpu")
        x = torch.tensor([float(rank)], device=device)
        dist.all_reduce(x)
        expected = world * (world - 1) / 2
        ok = x.item() == expected
        print(f"rank {rank}/{world} on {os.uname().nodename}: all_reduce over {backend} {'ok' if ok else f'WRONG ({x.item()} != {expected})'}")
        dist.destroy_process_group()
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
