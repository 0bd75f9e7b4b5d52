"""Trainer → engine weights: Megatron shards (any TP, PP) resharded into HF names, streamed.

Every rank yields the complete HF-named set in a fixed order, one parameter at a time: TP shards
are all-gathered and merged (fused QKV per KV group, [gate; up], row/column splits, vocabulary
padding removed), and with PP each stage broadcasts its parameters to the other stages in
buckets of at most `bucket_bytes`. Peak extra memory is one bucket plus one merged parameter;
the engine (any inference TP) slices what it needs while loading. Everything stays on the
policy's device: on GPU the tensors go from Megatron's parameters to the engine's without a host
copy (TP gathers and PP broadcasts over NCCL).
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Tuple

import torch
import torch.distributed as dist

from ..models.mapping import hf_param_shapes, megatron_to_hf


def _stage_hf_tensors(policy) -> Iterator[Tuple[str, torch.Tensor]]:
    for base, name, t in policy.named_tp_merged_parameters():
        if name == "output_layer.weight" and policy.spec.tie_word_embeddings:
            continue  # the last stage's copy of a tied embedding
        yield from megatron_to_hf(name, t, policy.spec, base)


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


def policy_hf_weights(policy, bucket_bytes: int = 64 * 2**20) -> Iterator[Tuple[str, torch.Tensor]]:
    """Complete HF-named weights of a MegatronPolicy, on every rank, streamed."""
    if policy.pp_size == 1:
        yield from _stage_hf_tensors(policy)
        return
    group = policy.pp_group
    for stage in range(policy.pp_size):
        src = dist.get_global_rank(group, stage)
        local = list(_stage_hf_tensors(policy)) if policy.pp_rank == stage else None
        meta = [[(n, tuple(t.shape), t.dtype) for n, t in local] if local is not None else None]
        dist.broadcast_object_list(meta, src=src, group=group)
        buckets: List[List[int]] = [[]]
        size = 0
        for i, (_, shape, dtype) in enumerate(meta[0]):
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            if buckets[-1] and size + nbytes > bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(i)
            size += nbytes
        for bucket in buckets:
            if not bucket:
                continue
            dtype = meta[0][bucket[0]][2]
            numels = [torch.Size(meta[0][i][1]).numel() for i in bucket]
            if local is not None:
                flat = torch.cat([local[i][1].reshape(-1).to(dtype) for i in bucket]).contiguous()
            else:
                flat = torch.empty(sum(numels), dtype=dtype, device=policy.device)
            dist.broadcast(flat, src=src, group=group)
            for i, part in zip(bucket, flat.split(numels)):
                name, shape, _ = meta[0][i]
                yield name, part.view(shape)
            del flat


def sync_policy_to_engine(policy, engine, bucket_bytes: int = 64 * 2**20) -> Dict[str, float]:
    """Pushes the policy's current weights into the engine in place; returns bytes and seconds."""
    import time

    t0 = time.perf_counter()
    check_finite(policy)
    shapes = hf_param_shapes(policy.spec)
    nbytes = engine.update_weights(policy_hf_weights(policy, bucket_bytes), names_and_shapes=shapes)
    return {"weight_sync_bytes": float(nbytes), "weight_sync_s": time.perf_counter() - t0}
