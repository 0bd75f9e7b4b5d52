"""Trainer → engine weights: the policy's one walk of its weights (`MegatronPolicy.hf_weights`:
HF names, TP-merged, PP-streamed in buckets) into the engine in place.

Everything stays on the policy's device: on GPU the tensors go from Megatron's parameters to the
engine's without a host copy (TP gathers and PP broadcasts over NCCL); the engine (any inference
TP) slices what it needs while loading.
"""
from __future__ import annotations

import time
from typing import Dict

import torch
import torch.distributed as dist

from ..models.mapping import hf_param_shapes


def check_finite(policy) -> None:
    """Raises on every rank if any rank's parameters hold inf/NaN (before anything reaches the engine).
    One device-side flag and one host sync, whatever the number of parameters."""
    bad = torch.zeros(1, device=policy.device)
    for chunk in policy.chunks:
        for p in chunk.module.parameters():
            bad = torch.maximum(bad, (~torch.isfinite(p.detach())).any().float().reshape(1))
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        raise ValueError("policy weights hold non-finite values; the engine keeps its previous weights")


def sync_policy_to_engine(policy, engine, bucket_bytes: int = 64 * 2**20) -> Dict[str, float]:
    """Pushes the policy's current weights into the engine in place; returns bytes and seconds."""
    t0 = time.perf_counter()
    check_finite(policy)
    shapes = hf_param_shapes(policy.spec)
    nbytes = engine.update_weights(policy.hf_weights(bucket_bytes), names_and_shapes=shapes)
    return {"weight_sync_bytes": float(nbytes), "weight_sync_s": time.perf_counter() - t0}
