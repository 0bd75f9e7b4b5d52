"""The policy's weights under Hugging Face names: loading them into Megatron's shards, and the one
walk that gives them back.

Contract: `hf_weights(policy)` is the only way weights leave a Megatron model: every rank yields
the complete HF-named set in a fixed order, one tensor at a time, on the device (TP-merged,
expert-TP-merged and EP-gathered, PP-broadcast in buckets). The weight sync to the engines, the HF
export and the tests all read it; the checkpoint converter applies its last step,
`mapping.megatron_state_to_hf`, to a layout-free checkpoint loaded whole at TP 1.
`load_hf_state_dict` is its inverse for full HF tensors held on every rank (small models, tests).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist

from .. import device as dev
from ..models.mapping import (
    expert_index,
    hf_to_megatron,
    layer_offset,
    megatron_state_to_hf,
    merge_tp,
    param_kind,
    unfuse_hf_experts,
    with_expert_index,
)


def _buckets(sizes, bucket_bytes: int) -> List[List[int]]:
    """Consecutive indices grouped into buckets of at most bucket_bytes (a larger item alone) and
    one dtype each; sizes: [(nbytes, dtype)]."""
    buckets: List[List[int]] = []
    size = 0
    for i, (nbytes, dtype) in enumerate(sizes):
        if not buckets or size + nbytes > bucket_bytes or sizes[buckets[-1][0]][1] != dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += nbytes
    return buckets


def _chunk_layer_base(policy, i: int) -> int:
    vpp = policy.cfg.virtual_pipeline_model_parallel_size
    return layer_offset(policy.spec, policy.pp_rank, policy.pp_size, i if vpp else None, vpp)

def load_hf_state_dict(policy, hf: Dict[str, torch.Tensor]) -> None:
    """Loads full HF-named tensors (every rank holds them; small models and tests). Experts in
    checkpoint names or fused as transformers keeps them in memory."""
    vpp = policy.cfg.virtual_pipeline_model_parallel_size
    hf = unfuse_hf_experts(hf)
    moe = dict(ep_rank=policy.ep_rank, ep=policy.ep, etp_rank=policy.etp_rank, etp=policy.etp) if policy.spec.is_moe else {}
    for i, chunk in enumerate(policy.chunks):
        sd = hf_to_megatron(hf, policy.spec, policy.tp_rank, policy.cfg.tensor_model_parallel_size, policy.pp_rank,
                            policy.pp_size, i if vpp else None, vpp, layer_spec=policy.layer_spec, **moe)
        own = chunk.module.state_dict()
        missing = [k for k in own if not k.endswith("_extra_state") and k not in sd]
        if missing:
            raise KeyError(f"HF state dict lacks tensors for {missing[:5]}")
        with torch.no_grad():
            for k, v in sd.items():
                if k not in own:
                    raise KeyError(f"unexpected parameter {k}")
                if tuple(own[k].shape) != tuple(v.shape):
                    raise ValueError(f"{k}: shape {tuple(v.shape)} from HF, {tuple(own[k].shape)} in the model")
                own[k].copy_(v)
    with dev.megatron_scope():
        policy.optimizer.reload_model_params()

def _named_tp_merged_parameters(policy, bucket_bytes: int = 64 * 2**20):
    """(chunk layer base, Megatron name, TP-merged tensor) for this PP stage's parameters; the
    experts' weights are merged over the expert-TP group and gathered over the EP group in
    buckets of up to `bucket_bytes` per rank (one all-gather each): every EP rank yields every
    expert, under its global index."""
    tp = policy.cfg.tensor_model_parallel_size
    pending: List[tuple] = []  # (chunk layer base, name, local index, tensor) of experts not yet gathered

    def flush():
        yield from _gather_experts(policy, pending)
        pending.clear()

    for i, chunk in enumerate(policy.chunks):
        for name, p in chunk.module.state_dict().items():
            if name.endswith("_extra_state"):
                continue
            t = p.detach()
            local = expert_index(name) if policy.spec.is_moe else None
            size, group = (policy.etp, policy.etp_group) if local is not None else (tp, policy.tp_group)
            if size > 1 and param_kind(name) != "replicated":
                parts = [torch.empty_like(t) for _ in range(size)]
                dist.all_gather(parts, t.contiguous(), group=group)
                t = merge_tp(name, parts)
            if local is None:
                yield _chunk_layer_base(policy, i), name, t
                continue
            if pending and (sum(x[3].numel() * x[3].element_size() for x in pending) + t.numel() * t.element_size()
                            > bucket_bytes or pending[0][3].dtype != t.dtype):
                yield from flush()
            pending.append((_chunk_layer_base(policy, i), name, local, t))
    yield from flush()

def _gather_experts(policy, items: List[tuple]):
    """One flat all-gather over the EP group for a bucket of expert tensors (the same names on
    every EP rank: local numbering), then each expert under its global index."""
    if not items:
        return
    per = policy.spec.num_experts // policy.ep
    if policy.ep == 1:
        for base, name, local, t in items:
            yield base, name, t
        return
    flat = torch.cat([t.reshape(-1) for *_, t in items]).contiguous()
    parts = [torch.empty_like(flat) for _ in range(policy.ep)]
    dist.all_gather(parts, flat, group=policy.ep_group)
    numels = [t.numel() for *_, t in items]
    pieces = [part.split(numels) for part in parts]
    for k, (base, name, local, t) in enumerate(items):
        for r in range(policy.ep):
            yield base, with_expert_index(name, r * per + local), pieces[r][k].view(t.shape)

def _stage_hf_tensors(policy, bucket_bytes: int = 64 * 2**20):
    """(HF name, tensor) of this PP stage's parameters, TP-merged, on the device."""
    for base, name, t in _named_tp_merged_parameters(policy, bucket_bytes):
        yield from megatron_state_to_hf([(name, t)], policy.spec, base)

def hf_weights(policy, bucket_bytes: int = 64 * 2**20):
    """The one walk of the weights: every rank yields the complete HF-named set in a fixed order,
    one tensor at a time, on the device. TP shards are all-gathered and merged (fused QKV per KV
    group, [gate; up], row/column splits, vocabulary padding removed); MoE experts are merged over
    expert-TP and all-gathered over EP in buckets of at most `bucket_bytes`; with PP each stage
    broadcasts its tensors to the others in buckets of at most `bucket_bytes`, so the peak extra
    memory is one bucket plus one merged parameter. Used by the weight sync and the export."""
    if policy.pp_size == 1:
        yield from _stage_hf_tensors(policy, bucket_bytes)
        return
    for stage in range(policy.pp_size):
        src = dist.get_global_rank(policy.pp_group, stage)
        local = list(_stage_hf_tensors(policy, bucket_bytes)) if policy.pp_rank == stage else None
        meta = [[(n, tuple(t.shape), t.dtype) for n, t in local] if local is not None else None]
        dist.broadcast_object_list(meta, src=src, group=policy.pp_group)
        for bucket in _buckets([(torch.Size(s).numel() * torch.empty((), dtype=d).element_size(), d)
                                for _, s, d in meta[0]], bucket_bytes):
            dtype = meta[0][bucket[0]][2]
            numels = [torch.Size(meta[0][i][1]).numel() for i in bucket]
            if local is not None:
                flat = torch.cat([local[i][1].reshape(-1).to(dtype) for i in bucket]).contiguous()
            else:
                flat = torch.empty(sum(numels), dtype=dtype, device=policy.device)
            dist.broadcast(flat, src=src, group=policy.pp_group)
            for i, part in zip(bucket, flat.split(numels)):
                name, shape, _ = meta[0][i]
                yield name, part.view(shape)
            del flat

def check_finite(policy) -> None:
    """Raises on every rank if any rank's parameters hold inf/NaN. One device-side flag and one
    host sync, whatever the number of parameters."""
    bad = torch.zeros(1, device=policy.device)
    for chunk in policy.chunks:
        for p in chunk.module.parameters():
            bad = torch.maximum(bad, (~torch.isfinite(p.detach())).any().float().reshape(1))
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        raise ValueError("policy weights hold non-finite values; the engine keeps its previous weights")

def hf_state_dict(policy) -> Dict[str, torch.Tensor]:
    """The full model under HF names on every rank, as host copies (tests, export)."""
    return {name: t.cpu().clone() for name, t in hf_weights(policy)}
