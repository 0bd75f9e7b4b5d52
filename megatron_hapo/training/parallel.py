"""Process groups: torch.distributed + Megatron-Core parallel state, the way Megatron jobs start.

Launched under torchrun/srun (env://), or in-process for a single rank. NCCL on GPU, gloo on CPU.
"""
from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist

from . import cpu_shims


def init_distributed(timeout_s: int = 1800) -> None:
    """torch.distributed from the launcher's environment; a single process without one."""
    cpu_shims.apply()
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def init_model_parallel(tp: int = 1, pp: int = 1, vpp: Optional[int] = None, seed: int = 1234) -> None:
    """Megatron's TP/PP/DP groups over the current world; errors name the setting."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    init_distributed()
    world = dist.get_world_size()
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor_model_parallel_size={tp} and pipeline_model_parallel_size={pp} must be ≥ 1")
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tensor_model_parallel_size × "
                         f"pipeline_model_parallel_size = {tp} × {pp}")
    if vpp is not None and pp == 1:
        raise ValueError("virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size > 1")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp
    )
    model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
