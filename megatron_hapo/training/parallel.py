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

import dataclasses
import datetime
import os
import socket
from typing import Optional

import torch.distributed as dist

from .. import device as dev

_CONTROL = None
_ROLES = None


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


@dataclasses.dataclass
class Roles:
    """rollout.placement=separate: the launch's ranks split into trainers (the first ones) and engines
    (the last `engines`). Each role has its own default process group (Megatron sizes its groups from
    the world, so the trainers' world must hold only trainers; vLLM's external launcher likewise takes
    the engines' world as its own); three bridge groups join trainer 0 with the engine ranks:
    `messages` (gloo, trainer 0 broadcasts headers to every engine rank), `weights` (NCCL on GPU, gloo
    on CPU: the weight buckets, same members) and `batches` (gloo, trainer 0 and engine 0: rollouts,
    evaluation results and errors, point to point). Ranks outside a bridge group hold None for it."""

    role: str  # "trainer" | "engine"
    launch_rank: int
    launch_world: int
    engines: int  # ranks that host engines
    messages: object = None
    weights: object = None
    batches: object = None

    @property
    def trainers(self) -> int:
        return self.launch_world - self.engines

    @property
    def is_trainer(self) -> bool:
        return self.role == "trainer"


def roles() -> Optional[Roles]:
    """The split of init_roles, or None (colocated: every rank trains and hosts an engine)."""
    return _ROLES


def init_roles(engine_ranks: int, timeout_s: int = 1800, control_timeout_s: int = 4 * 3600) -> Roles:
    """Splits the launch (torchrun/srun's RANK and WORLD_SIZE) into trainer and engine ranks, each with
    its own default process group and RANK/WORLD_SIZE (the role's), and builds the bridge groups
    (see `Roles`). Idempotent; LOCAL_RANK (the device) is kept."""
    global _ROLES
    if _ROLES is not None:
        return _ROLES
    if dist.is_initialized():
        raise RuntimeError("rollout.placement=separate: torch.distributed was set up before the roles were split")
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if not 1 <= engine_ranks < world:
        raise ValueError(f"rollout.engine_ranks={engine_ranks}: separate placement needs at least one engine rank and "
                         f"one trainer rank among the launch's {world} (torchrun --nproc-per-node × nodes)")
    os.environ.setdefault("LOCAL_RANK", "0")
    dev.set_current()
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world,
                                       timeout=datetime.timedelta(seconds=timeout_s)))
    # torchrun --max-restarts: the agent's store outlives an attempt, with the addresses the dead attempt's
    # groups published; each attempt's groups live under their own prefix, or the restarted ranks would
    # connect to those
    store = dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
    trainers = world - engine_ranks
    role = "trainer" if rank < trainers else "engine"
    role_rank, role_world = (rank, trainers) if role == "trainer" else (rank - trainers, engine_ranks)
    os.environ.update(RANK=str(role_rank), WORLD_SIZE=str(role_world))
    dist.init_process_group(dev.dist_backend(), store=dist.PrefixStore(f"{role}/", store), rank=role_rank,
                            world_size=role_world, timeout=datetime.timedelta(seconds=timeout_s))
    out = Roles(role, rank, world, engine_ranks)
    long = datetime.timedelta(seconds=control_timeout_s)
    if rank == 0 or role == "engine":  # trainer 0 and the engine ranks: 0 and 1 … engines
        member = 0 if rank == 0 else role_rank + 1
        out.messages = dist.ProcessGroupGloo(dist.PrefixStore("bridge-messages/", store), member, engine_ranks + 1, long)
        if dev.is_gpu():
            out.weights = dist.ProcessGroupNCCL(dist.PrefixStore("bridge-weights/", store), member, engine_ranks + 1)
        else:
            out.weights = dist.ProcessGroupGloo(dist.PrefixStore("bridge-weights/", store), member, engine_ranks + 1, long)
    if rank == 0 or rank == trainers:  # trainer 0 and engine 0
        out.batches = dist.ProcessGroupGloo(dist.PrefixStore("bridge-batches/", store), int(rank != 0), 2, long)
    _ROLES = out
    init_distributed(timeout_s, control_timeout_s)  # the role's control group
    return out


def current_roles(cfg) -> Optional[Roles]:
    """This rank's role for a Trainer: None when colocated; under rollout.placement=separate the launch's
    split (made here if `train.run` has not), refusing an engine rank: it serves rollouts, it does not train."""
    if cfg.rollout.placement != "separate":
        return None
    p = cfg.parallel
    out = init_roles(cfg.rollout.engine_ranks, p.timeout_s, p.control_timeout_s)
    if not out.is_trainer:
        raise RuntimeError(f"Trainer: launch rank {out.launch_rank} is an engine rank (the last "
                           f"rollout.engine_ranks={out.engines} of {out.launch_world}); start every rank through "
                           f"megatron_hapo.train.run(cfg), which serves the engine ranks and trains on the others")
    return out


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
