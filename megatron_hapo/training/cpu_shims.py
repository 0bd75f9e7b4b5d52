"""Lets megatron-core 0.16.1 run on CPU with gloo: every CUDA assumption it makes, in one place.

Applied only when CUDA is absent (`apply()` is a no-op on a GPU machine). What it covers, each
measured on megatron-core 0.16.1:
- torch.cuda.current_device() in rotary embeddings, p2p receive buffers, checkpoint saving → "cpu";
- torch.cuda.synchronize / streams / empty_cache → no-ops;
- the CUDA RNG tracker → the CPU default generator (torch.cuda.manual_seed must not recurse into
  torch.manual_seed, which itself calls torch.cuda.manual_seed_all);
- hard-coded device="cuda" tensors (the schedules' token counter, grad-norm buffers, the loss
  scale) → a TorchFunctionMode that rewrites the device of factory calls, entered only for the
  duration of a call into Megatron (`scope()`, through `device.megatron_scope()`), never left
  entered process-wide;
- Tensor.cuda()/Module.cuda() (tied embeddings with PP > 1, optimizer state) → stay on CPU;
- tensor.type() checks that expect "torch.cuda.FloatTensor" (grad clipping, optimizers) → report
  CPU tensors under their CUDA type name;
- what a missing Transformer Engine, Apex or psutil needs (torch AdamW's `step` on resume, the MoE
  router's TE names, the checkpoint writer's memory probe) is `lib_shims`, applied on any device;
- MoE: the alltoall
  dispatcher records an event on its device-to-host stream and later synchronizes on it → a no-op
  event; it converts the split sizes to numpy only for CUDA tensors, and gloo's all_to_all_single
  rejects tensors there → CPU tensors are converted too when numpy is asked for;
- MoE with TP > 1 (sequence parallel): the dispatcher all-gathers and reduce-scatters uneven token
  counts over the TP group; gloo's all_gather wants equal sizes → padded to the largest and cut,
  the uneven reduce-scatter → an all-reduce of which each rank keeps its part.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

from . import lib_shims

_APPLIED = False
_FACTORIES = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.arange, torch.randn, torch.rand,
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.as_tensor, torch.eye, torch.randint,
}


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # an ordinal from current_device()


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        elif func in (torch.Tensor.to,) and args and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _Stream:
    def __init__(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def record_event(self, *a, **k):
        return _Event()


class _Event:
    def __init__(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def wait(self, *a, **k):
        pass

    def record(self, *a, **k):
        pass

    def query(self):
        return True


@contextlib.contextmanager
def _null_ctx(*a, **k):
    yield


def apply() -> bool:
    """Installs the shims once if CUDA is absent; returns whether they are active."""
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available():
        return False
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.set_device = lambda *a, **k: None
    cuda.device_count = lambda: 0
    cuda.current_stream = lambda *a, **k: _Stream()
    cuda.default_stream = lambda *a, **k: _Stream()
    cuda.Stream = _Stream
    cuda.stream = _null_ctx
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None

    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    original_type = torch.Tensor.type

    def _type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original_type(self)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = _type

    lib_shims.apply()  # what a missing TE/Apex/psutil needs, on any device (the GPU path applies it too)
    cuda.Event = _Event
    _moe()
    _APPLIED = True
    return True


def _moe() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = to_cpu
    _uneven_collectives()


def _uneven_collectives() -> None:
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def uneven(sizes) -> bool:
        return sizes is not None and len(set(int(n) for n in sizes)) > 1

    def gather_uneven(input_, group, output_split_sizes=None, use_global_buffer=False):
        if not uneven(output_split_sizes) or group.size() == 1:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        padded = input_.new_zeros((max(sizes),) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    def reduce_scatter_uneven(input_, group, input_split_sizes=None, use_global_buffer=False):
        if not uneven(input_split_sizes) or group.size() == 1:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        return torch.split(total, [int(n) for n in input_split_sizes])[group.rank()].contiguous()

    mappings._gather_along_first_dim = gather_uneven
    mappings._reduce_scatter_along_first_dim = reduce_scatter_uneven


def _restore_streams() -> None:
    """vLLM's CPU worker swaps torch.cuda.Stream for a placeholder without record_event while it
    sets up, and the placeholder can outlive that; Megatron's MoE dispatcher keeps a class-level
    stream made with whatever was there. Both are put back to the shim's at every entry."""
    torch.cuda.Stream = _Stream
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    stream = getattr(MoEAlltoAllTokenDispatcher, "cuda_dtoh_stream", None)
    if stream is not None and not isinstance(stream, _Stream):
        MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _Stream()


_DEPTH = 0


@contextlib.contextmanager
def scope():
    """Applies the shims (once) and redirects device="cuda" factory calls to the CPU while the
    block runs; re-entrant. Outside it no TorchFunctionMode is active."""
    global _DEPTH
    if not apply():
        yield
        return
    if _DEPTH:
        _DEPTH += 1
        try:
            yield
        finally:
            _DEPTH -= 1
        return
    _DEPTH = 1
    _restore_streams()
    try:
        with _CudaToCpu():
            yield
    finally:
        _DEPTH = 0
