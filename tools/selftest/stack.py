"""Tier 1, the stack: native imports and collectives on the mixed backend."""

import torch

from megatron_hapo import device as dev

from .core import STACK, check, installed


@check("stack and native imports", STACK)
def c_stack(ctx):
    import importlib

    import megatron.core

    versions = [f"torch {torch.__version__} (CUDA {torch.version.cuda})", f"mcore {megatron.core.__version__}"]
    for label, module in (("vLLM", "vllm"), ("TE", "transformer_engine"), ("transformers", "transformers")):
        if installed(module):
            versions.append(f"{label} {getattr(importlib.import_module(module), '__version__', '?')}")
        else:
            versions.append(f"{label} not installed")
    figure = ", ".join(versions) + f"; layer spec {ctx.layer_spec}"
    if not dev.is_gpu():
        return figure + "; native GPU modules skipped: no GPU", True
    natives = [m for m, owner in (("vllm._C", "vllm"), ("vllm.cumem_allocator", "vllm"),
                                  ("transformer_engine.pytorch", "transformer_engine")) if installed(owner)]
    for mod in natives:
        importlib.import_module(mod)
    figure += f"; native modules loaded: {', '.join(natives) or 'none installed'}; GPU {torch.cuda.get_device_name()}"
    return figure, True


@check("collectives on the mixed backend", STACK)
def c_collectives(ctx):
    import torch.distributed as dist

    from megatron_hapo.training.parallel import control_group, init_model_parallel

    init_model_parallel(1, 1)
    backend = str(dist.get_backend())
    cpu = torch.ones(4)
    dist.all_reduce(cpu)
    dist.all_reduce(cpu, group=control_group())
    figure = f"backend {backend}: cpu all_reduce ok"
    ok = cpu.sum().item() == 4 * dist.get_world_size() ** 2
    if dev.is_gpu():
        gpu = torch.ones(4, device=dev.device())
        dist.all_reduce(gpu)
        ok = ok and gpu.sum().item() == 4 * dist.get_world_size() and "nccl" in backend and "gloo" in backend
        figure += f", cuda all_reduce ok on {gpu.device}"
    return figure, ok
