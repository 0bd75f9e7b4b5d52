"""Checks a node or a cluster before a run: the stack, its native parts, devices, and collectives.

    python tools/check_env.py [--no-engine]                          # one process
    torchrun --nnodes N --nproc-per-node 8 ... tools/check_env.py    # every rank

Rank 0 prints the stack (torch and its CUDA, the driver, megatron-core, Transformer Engine, vLLM).
On a GPU node it also imports the compiled parts that a plain `import vllm` does not load
(`vllm._C`, `vllm.cumem_allocator`, `transformer_engine.pytorch`) and compares CUDA versions (torch's
build vs the driver, vLLM's torch pin vs the installed torch, TE's CUDA major vs torch's). Every rank
then all-reduces its rank id over the mixed backend, once on the CPU (gloo) and once on its GPU
(NCCL), so a broken fabric fails here and not mid-training; last, every rank builds a tiny vLLM
engine on its GPU that generates a few tokens (skip with --no-engine, e.g. at image build time).
The engine comes after the collectives: built first, it would make vLLM create a world of its own.
Exit status 1 on any failure, naming it.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name, module in (("torch", "torch"), ("megatron-core", "megatron.core"), ("transformer-engine", "transformer_engine"),
                         ("vllm", "vllm"), ("transformers", "transformers"), ("sentencepiece", "sentencepiece")):
        try:
            mod = importlib.import_module(module)
            out[name] = getattr(mod, "__version__", "installed")
        except Exception as exc:  # absent or broken: say which
            out[name] = f"unavailable ({type(exc).__name__})"
    import torch

    out["cuda (torch build)"] = torch.version.cuda or "none (CPU build)"
    out["devices"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if torch.cuda.is_available():
        drv = torch._C._cuda_getDriverVersion()
        out["cuda (driver supports)"] = f"{drv // 1000}.{drv % 1000 // 10}"
        out["gpu"] = torch.cuda.get_device_name()
    return out


def gpu_problems(info: dict) -> list:
    """The native imports and version agreements a GPU run needs; [] when all hold."""
    import torch
    from importlib.metadata import PackageNotFoundError, distributions, requires

    problems = []
    for module in ("vllm._C", "vllm.cumem_allocator", "transformer_engine.pytorch"):
        try:
            importlib.import_module(module)
        except Exception as exc:
            problems.append(f"import {module}: {type(exc).__name__}: {exc}")
    torch_cuda = tuple(int(x) for x in (torch.version.cuda or "0.0").split(".")[:2])
    driver = tuple(int(x) for x in info.get("cuda (driver supports)", "0.0").split("."))
    if driver < torch_cuda:
        problems.append(f"the driver supports CUDA {driver}, torch is built for {torch_cuda}: update the driver or "
                        "use an image built for the older CUDA")
    try:
        pins = [r for r in requires("vllm") or [] if r.replace(" ", "").startswith("torch==")]
    except PackageNotFoundError:
        pins = []
    for pin in pins:
        want = pin.replace(" ", "").split("==")[1].split(";")[0]
        if torch.__version__.split("+")[0] != want:
            problems.append(f"vLLM was built against torch {want}, torch {torch.__version__} is installed: its compiled "
                            "kernels will not load")
    te_cuda = [d.metadata["Name"] for d in distributions() if (d.metadata["Name"] or "").lower().startswith("transformer_engine_cu")
               or (d.metadata["Name"] or "").lower().startswith("transformer-engine-cu")]
    for name in te_cuda:
        major = name.lower().rsplit("cu", 1)[1]
        if major.isdigit() and int(major) != torch_cuda[0]:
            problems.append(f"{name} is for CUDA {major}, torch for CUDA {torch_cuda[0]}")
    return problems


def tiny_engine() -> str:
    """Builds a tiny model in a temp folder and a vLLM engine on it; generates 4 tokens."""
    import tempfile

    from megatron_hapo.data import addition
    from megatron_hapo.rollout.engine import RolloutEngine, SamplingConfig

    with tempfile.TemporaryDirectory() as tmp:
        addition.build_model_dir(tmp)
        engine = RolloutEngine(tmp, max_model_len=64, gpu_memory_utilization=0.1, dtype="float32")
        out = engine.generate([[1, 5, 6, 7]], 1, SamplingConfig(max_tokens=4))
        n = out[0][0].length
        engine.close()
    return f"tiny vLLM engine generated {n} tokens"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--no-engine", action="store_true", help="do not build the tiny vLLM engine")
    a = p.parse_args(argv)
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    failed = False
    problems = []
    if rank == 0:
        info = versions()
        for k, v in info.items():
            print(f"{k:>24}: {v}")
        if torch.cuda.is_available():
            problems = gpu_problems(info)
            for problem in problems:
                print(f"PROBLEM: {problem}")
            failed = bool(problems)
    # Collectives first, the engine last: an engine built before the job's group exists would make
    # vLLM create a world of its own (one rank, NCCL only), and the CPU all-reduce would then fail
    # while the other ranks wait out the timeout.
    if world > 1:
        from megatron_hapo import device as dev
        from megatron_hapo.training.parallel import init_distributed

        init_distributed(timeout_s=300, control_timeout_s=300)
        expected = world * (world - 1) / 2
        for where in ["cpu"] + (["cuda"] if dev.is_gpu() else []):
            x = torch.tensor([float(rank)], device=dev.device() if where == "cuda" else "cpu")
            dist.all_reduce(x)
            ok = x.item() == expected
            failed = failed or not ok
            print(f"rank {rank}/{world} on {os.uname().nodename}: {where} all_reduce over {dist.get_backend()} "
                  f"{'ok' if ok else f'WRONG ({x.item()} != {expected})'}")
    if torch.cuda.is_available() and not a.no_engine:
        # every rank builds its engine (under torch.distributed vLLM's groups are collective), unless
        # rank 0 already found the stack broken
        skip = [bool(problems)]
        if world > 1:
            dist.broadcast_object_list(skip, src=0)
        if not skip[0]:
            try:
                print(f"rank {rank}: {tiny_engine()}")
            except Exception as exc:
                print(f"PROBLEM: rank {rank}: the tiny vLLM engine failed: {type(exc).__name__}: {exc}")
                failed = True
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
