"""The one place that knows which device a rank computes on (docs: "Two stacks, one code path").

Every rank owns one device, chosen from the launcher's LOCAL_RANK before any engine or model
exists: `cuda:LOCAL_RANK` on a GPU node, the CPU otherwise. Code elsewhere creates tensors with
`device()` and never branches on CUDA itself; the few GPU-only lines (memory accounting, the
allocator, the device index) live here and are exercised by `tools/gpu_selftest.py`.

Collectives: on GPU the default process group is the mixed backend `cpu:gloo,cuda:nccl` (as verl
does), so a collective goes over NCCL when its tensors are on the GPU and over gloo when they are
on the CPU; each collective keeps its tensors on one device on every rank. On CPU it is gloo.
"""
from __future__ import annotations

import contextlib
import gc
import os
from typing import Dict, Optional

import torch


def is_gpu() -> bool:
    return torch.cuda.is_available()


def local_rank() -> int:
    value = os.environ.get("LOCAL_RANK", "0")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"LOCAL_RANK={value!r}: expected an integer (set by torchrun/srun)") from None


def device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK on GPU nodes, cpu otherwise."""
    return torch.device("cuda", local_rank()) if is_gpu() else torch.device("cpu")


def set_current() -> torch.device:
    """Makes this rank's GPU the current CUDA device (before anything allocates); returns the device."""
    dev = device()
    if dev.type == "cuda":
        if dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={dev.index} but only {torch.cuda.device_count()} GPUs are visible "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        torch.cuda.set_device(dev)
    return dev


def dist_backend() -> str:
    """The default process group's backend: CPU tensors over gloo, CUDA tensors over NCCL."""
    return "cpu:gloo,cuda:nccl" if is_gpu() else "gloo"


def resolve_layer_spec(value: Optional[str]) -> str:
    """Megatron layer spec: te (Transformer Engine) or local (torch modules); None/auto: te where
    CUDA is, local otherwise."""
    if value in (None, "auto"):
        return "te" if is_gpu() else "local"
    if value not in ("te", "local"):
        raise ValueError(f"model.layer_spec: {value!r}; expected auto, te or local")
    if value == "te" and not is_gpu():
        raise ValueError("model.layer_spec=te: Transformer Engine needs a GPU; use local (or auto) on CPU")
    return value


def megatron_scope():
    """Context for calls into Megatron-Core: what a missing TE/Apex/psutil needs is installed once on
    any device (training/lib_shims); on CPU its CUDA assumptions are also redirected for the duration
    (training/cpu_shims, which applies lib_shims after its own CUDA patches: megatron's optimizer
    modules are imported under them); on GPU nothing else changes."""
    from .training import cpu_shims, lib_shims

    if is_gpu():
        lib_shims.apply()
        return contextlib.nullcontext()

    return cpu_shims.scope()


def free_cached_memory() -> None:
    """Returns cached blocks to the device before another component (the engine) allocates."""
    gc.collect()
    if is_gpu():
        torch.cuda.empty_cache()


def memory_report() -> Dict[str, float]:
    """GiB reserved by torch's allocator and free on the device (empty on CPU)."""
    if not is_gpu():
        return {}
    return {"reserved_gib": torch.cuda.memory_reserved() / 2**30, "free_gib": torch.cuda.mem_get_info()[0] / 2**30}


def check_allocator_config(enable_sleep_mode: bool, environ=None) -> Optional[str]:
    """vLLM's sleep mode allocates through its own CUDA virtual-memory pool, which refuses
    `expandable_segments:True` in PYTORCH_CUDA_ALLOC_CONF. With sleep mode on, the setting is
    removed from the environment (before torch's allocator starts) and the message saying so is
    returned; without sleep mode nothing changes."""
    env = os.environ if environ is None else environ
    conf = env.get("PYTORCH_CUDA_ALLOC_CONF", "")
    if not enable_sleep_mode or "expandable_segments:true" not in conf.replace(" ", "").lower():
        return None
    kept = [p for p in conf.split(",") if p.strip() and not p.replace(" ", "").lower().startswith("expandable_segments:")]
    if kept:
        env["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(kept)
    else:
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    if is_gpu() and torch.cuda.is_initialized():
        raise ValueError("PYTORCH_CUDA_ALLOC_CONF has expandable_segments:True, which vLLM's sleep mode "
                         "(rollout.enable_sleep_mode) cannot run with, and CUDA is already initialised: "
                         "unset it in the launch script")
    return (f"PYTORCH_CUDA_ALLOC_CONF={conf!r}: expandable_segments removed (vLLM's sleep mode, "
            f"rollout.enable_sleep_mode, cannot run with it)")
