"""Process groups: torch.distributed + Megatron-Core parallel state, the way Megatron jobs start.

Launched under torchrun/srun (env://), or in-process for a single rank. The default group uses
`device.dist_backend()`: `cpu:gloo,cuda:nccl` on GPU nodes (a collective runs over NCCL when its
tensors are on the GPU, over gloo when they are on the CPU), gloo on CPU.

Timeouts: the default group (and Megatron's groups made from it) times out after `timeout_s`
(30 min, torch's NCCL default; `parallel.timeout_s`), which bounds a hung training collective.
Control-plane exchanges that wait for the slowest engine (rollout summaries, the group exchange,
stop requests) run on a separate gloo group with its own, longer timeout (`control_timeout_s`,
default 4 h, `parallel.control_timeout_s`): a long rollout on one rank must not trip the NCCL
watchdog on the ranks that finished early and wait.
"""
from __future__ import annotations

import datetime
import os
import socket
from typing import Optional

import torch.distributed as dist

from .. import device as dev

_CONTROL = None


def init_distributed(timeout_s: int = 1800, control_timeout_s: int = 4 * 3600) -> None:
    """torch.distributed from the launcher's environment; a single process without one."""
    global _CONTROL
    dev.set_current()  # before anything (vLLM, Megatron, NCCL) touches CUDA
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")  # vLLM's external launcher reads it
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        dist.init_process_group(dev.dist_backend(), timeout=datetime.timedelta(seconds=timeout_s))
    if _CONTROL is None:
        _CONTROL = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=control_timeout_s))


def control_group():
    """The world over gloo with the long control-plane timeout (object gathers, CPU tensors only)."""
    if _CONTROL is None:
        raise RuntimeError("control_group(): init_distributed() has not run")
    return _CONTROL


def engine_group(size: int, control_timeout_s: int = 4 * 3600):
    """This rank's inference-TP group over gloo (ranks r·size … r·size + size − 1: one engine's ranks),
    or None at size 1. Every rank creates every group (torch.distributed's rule), keeps its own."""
    if size == 1:
        return None
    mine = None
    for first in range(0, dist.get_world_size(), size):
        g = dist.new_group(list(range(first, first + size)), backend="gloo",
                           timeout=datetime.timedelta(seconds=control_timeout_s))
        if first <= dist.get_rank() < first + size:
            mine = g
    return mine


def init_model_parallel(tp: int = 1, pp: int = 1, vpp: Optional[int] = None, seed: int = 1234,
                        timeout_s: int = 1800, control_timeout_s: int = 4 * 3600, ep: int = 1,
                        etp: Optional[int] = None) -> None:
    """Megatron's TP/PP/DP groups (and with MoE the expert groups: EP, expert-TP, expert-DP) over
    the current world; errors name the setting."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    init_distributed(timeout_s, control_timeout_s)
    world = dist.get_world_size()
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor_model_parallel_size={tp} and pipeline_model_parallel_size={pp} must be ≥ 1")
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tensor_model_parallel_size × "
                         f"pipeline_model_parallel_size = {tp} × {pp}")
    etp = tp if etp is None else etp
    if ep < 1 or etp < 1 or world % (etp * ep * pp):
        raise ValueError(f"world size {world} is not divisible by expert_tensor_parallel_size × "
                         f"expert_model_parallel_size × pipeline_model_parallel_size = {etp} × {ep} × {pp}")
    if vpp is not None:
        raise ValueError("virtual_pipeline_model_parallel_size: refused until a 2-GPU check matches the interleaved "
                         "schedule against PP without it (over gloo its training forward does not match)")
    with dev.megatron_scope():
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
            distributed_timeout_minutes=max(1, timeout_s // 60),
        )
        model_parallel_cuda_manual_seed(seed)


def destroy_model_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
