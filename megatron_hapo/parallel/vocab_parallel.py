"""Log-probs and entropy of vocabulary-sharded logits at a per-token temperature.

Under Megatron tensor parallelism rank r of the TP group holds logits for vocabulary ids
[r·V/TP, (r+1)·V/TP). Per token, with z = logits / T:

    m = max_v z_v                       (all-reduce MAX)
    S = Σ_v exp(z_v − m),  E = Σ_v exp(z_v − m)·(z_v − m),  d_y = z_y − m   (one all-reduce SUM of [S, E, d_y])
    log p(y) = d_y − log S,             H = log S − E / S

The full vocabulary is never gathered, and with `chunk_size` the token dimension is processed in
chunks, so the extra memory is a few fp32 copies of one chunk's logits, whatever the sequence
length. The backward pass recomputes the softmax chunk by chunk from the saved per-token log Z
and H (no collectives): d log p(y)/dz = onehot(y) − p, dH/dz = −p·(log p + H), both divided by T.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

# log p below this is exp() = 0 in fp32 and fp64; flooring it keeps (log p + H)·p finite at −inf logits.
_LOGP_FLOOR = -1.0e4
# columns per exp() temporary in the entropy-gradient path
_COLUMN_BLOCK = 4096


def _group_info(group) -> tuple[int, int]:
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _rows_view(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """A [rows, V] view of x without copying when the leading dims are a permutation of a dense
    layout (e.g. Megatron's [s, b, V] transposed to [b, s, V]); the permutation is returned so
    per-token tensors can follow it. Falls back to a copy only for truly strided inputs."""
    lead = list(range(x.dim() - 1))
    order = sorted(lead, key=lambda d: -x.stride(d))
    xp = x.permute(*order, x.dim() - 1)
    try:
        return xp.view(-1, x.shape[-1]), order
    except RuntimeError:
        return xp.reshape(-1, x.shape[-1]), order


def _per_row(t: torch.Tensor, order: list[int]) -> torch.Tensor:
    return t.permute(*order).reshape(-1)


def _unrow(flat: torch.Tensor, shape, order: list[int]) -> torch.Tensor:
    """Inverse of _per_row (or of _rows_view, with the last dim appended to order)."""
    permuted_shape = [shape[d] for d in order]
    inverse = [order.index(d) for d in range(len(order))]
    return flat.view(permuted_shape).permute(*inverse)


def _chunks(n: int, chunk_size: Optional[int]):
    step = n if not chunk_size else chunk_size
    for start in range(0, n, max(step, 1)):
        yield start, min(start + step, n)


def _local_max(raw: torch.Tensor, pad_from: int, inv_t: torch.Tensor) -> torch.Tensor:
    """max_v z_v over this shard's real vocabulary, from the raw logits (scaling by 1/T is monotonic)."""
    if pad_from == 0:  # this shard holds only padding
        return torch.full_like(inv_t, -torch.inf)
    return raw[:, :pad_from].amax(dim=-1).to(inv_t.dtype) * inv_t


def _shifted_chunk(raw, inv_t, shift, pad_from, out=None):
    """raw / T − shift in the compute dtype, one fused pass; padded vocabulary entries at −inf."""
    x = torch.addcmul((-shift)[:, None], raw, inv_t[:, None], out=out)
    if pad_from < x.shape[1]:
        x[:, pad_from:] = -torch.inf
    return x


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, temperature, group, chunk_size, vocab_size, entropy_grad):
        rank, world = _group_info(group)
        shard = logits.shape[-1]
        start_id = rank * shard
        pad_from = max(0, min(shard, vocab_size - start_id))  # local columns ≥ this are padding
        compute = torch.promote_types(logits.dtype, torch.float32)
        rows, order = _rows_view(logits)
        n = rows.shape[0]
        tgt = _per_row(target, order)
        inv_t = 1.0 / _per_row(temperature, order).to(compute)
        local_t = tgt - start_id
        owned = (local_t >= 0) & (local_t < shard)
        local_t = local_t.clamp(0, shard - 1)

        log_z = torch.empty(n, dtype=compute, device=logits.device)
        entropy = torch.empty(n, dtype=compute, device=logits.device)
        logp = torch.empty(n, dtype=compute, device=logits.device)
        for s, e in _chunks(n, chunk_size):
            m = _local_max(rows[s:e], pad_from, inv_t[s:e])
            if world > 1:
                dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows of all −inf: keep NaN-free
            x = _shifted_chunk(rows[s:e], inv_t[s:e], m, pad_from)  # z − m, the only chunk-sized buffer
            d_y = x.gather(1, local_t[s:e, None]).squeeze(1)
            d_y = torch.where(owned[s:e], d_y, torch.zeros_like(d_y))
            x.exp_()
            total = x.sum(-1)
            x.xlogy_(x)  # e·log e = e·(z − m), in place: one fp32 chunk is all the extra memory
            sums = torch.stack([total, x.sum(-1), d_y])
            if world > 1:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
            log_s = sums[0].log()
            logp[s:e] = sums[2] - log_s
            entropy[s:e] = log_s - sums[1] / sums[0]
            log_z[s:e] = m + log_s
            del x
        ctx.save_for_backward(logits, target, temperature, log_z, entropy)
        ctx.group, ctx.chunk_size, ctx.vocab_size = group, chunk_size, vocab_size
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no wasted pass
        out_logp = _unrow(logp, target.shape, order)
        out_entropy = _unrow(entropy.clone(), target.shape, order)
        if not entropy_grad:
            ctx.mark_non_differentiable(out_entropy)
        return out_logp, out_entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        logits, target, temperature, log_z, entropy = ctx.saved_tensors
        rank, _ = _group_info(ctx.group)
        shard = logits.shape[-1]
        start_id = rank * shard
        pad_from = max(0, min(shard, ctx.vocab_size - start_id))
        compute = log_z.dtype
        rows, order = _rows_view(logits)
        grad_rows = torch.empty(rows.shape, dtype=logits.dtype, device=logits.device)
        tgt = _per_row(target, order)
        inv_t = 1.0 / _per_row(temperature, order).to(compute)
        local_t = tgt - start_id
        owned = (local_t >= 0) & (local_t < shard)
        local_t = local_t.clamp(0, shard - 1)
        # d/dlogits = d/dz · 1/T: fold 1/T into the upstream gradients once
        g_lp = (_per_row(g_logp, order).to(compute) if g_logp is not None else torch.zeros_like(log_z)) * inv_t
        g_h = _per_row(g_entropy, order).to(compute) * inv_t if g_entropy is not None else None
        g_target = torch.where(owned, g_lp, torch.zeros_like(g_lp))
        in_place = grad_rows.dtype == compute  # write straight into the gradient, no extra buffer

        for s, e in _chunks(rows.shape[0], ctx.chunk_size):
            x = _shifted_chunk(rows[s:e], inv_t[s:e], log_z[s:e], pad_from, out=grad_rows[s:e] if in_place else None)
            if g_h is None:
                x.exp_().mul_(-g_lp[s:e, None])  # −g·p
            else:
                # −p·(g_lp + g_H·(log p + H)), in column blocks so the exp() temporary stays small
                a, b = g_lp[s:e, None], g_h[s:e, None]
                x.clamp_(min=_LOGP_FLOOR)
                for c in range(0, shard, _COLUMN_BLOCK):
                    blk = x[:, c:c + _COLUMN_BLOCK]
                    p = torch.exp(blk)
                    blk.add_(entropy[s:e, None]).mul_(b).add_(a).mul_(p).neg_()
                    del p
            x.scatter_add_(1, local_t[s:e, None], g_target[s:e, None])
            if not in_place:
                grad_rows[s:e].copy_(x)
            del x
        grad = _unrow(grad_rows, logits.shape, order + [logits.dim() - 1])
        return grad, None, None, None, None, None, None


def _check(logits, target_ids, temperature, group, chunk_size, vocab_size):
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits: expected a floating-point tensor, got {type(logits).__name__}"
                        f"{'' if not isinstance(logits, torch.Tensor) else ' of ' + str(logits.dtype)}")
    if logits.dim() < 1:
        raise ValueError("logits: expected shape [..., vocab/TP]")
    if not isinstance(target_ids, torch.Tensor) or target_ids.is_floating_point():
        raise TypeError("target_ids: expected an integer tensor of token ids")
    if tuple(target_ids.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"target_ids: shape {tuple(target_ids.shape)} does not match logits {tuple(logits.shape)} "
                         f"without the vocabulary dim {tuple(logits.shape[:-1])}")
    _, world = _group_info(group)
    padded = logits.shape[-1] * world
    if vocab_size is None:
        vocab_size = padded
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size: {vocab_size} must lie in (0, {padded}] (the padded vocabulary over {world} ranks)")
    if target_ids.numel() and bool(((target_ids < 0) | (target_ids >= vocab_size)).any()):
        bad = target_ids[(target_ids < 0) | (target_ids >= vocab_size)][0].item()
        raise ValueError(f"target_ids: id {bad} lies outside the vocabulary [0, {vocab_size})")
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() != 0 and tuple(temperature.shape) != tuple(target_ids.shape):
            raise ValueError(f"temperature: shape {tuple(temperature.shape)} does not match target_ids {tuple(target_ids.shape)}")
        if temperature.numel() and not bool((temperature > 0).all() & torch.isfinite(temperature).all()):
            raise ValueError("temperature: every temperature must be positive and finite")
        temperature = temperature.detach().to(logits.device).expand(target_ids.shape)
    else:
        t = float(temperature)
        if not (t > 0 and t < float("inf")):
            raise ValueError(f"temperature: must be positive and finite, got {temperature}")
        temperature = torch.full(target_ids.shape, t, dtype=torch.float32, device=logits.device)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size: must be a positive int or None, got {chunk_size!r}")
    return temperature, vocab_size


def vocab_parallel_logprobs_and_entropy(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    temperature=1.0,
    group=None,
    chunk_size: Optional[int] = None,
    vocab_size: Optional[int] = None,
    entropy_grad: bool = False,
):
    """Per-token log p(target) and entropy of softmax(logits / temperature) over the full vocabulary.

    logits: this rank's vocabulary shard [..., V/TP] (rank r of `group` holds ids [r·V/TP, (r+1)·V/TP));
    the full vocabulary when group is None. target_ids: global ids [...]. temperature: a float or a
    per-token tensor [...] (no gradient). chunk_size: tokens per chunk (None: one chunk).
    vocab_size: the true vocabulary when the shards carry Megatron's padding (ids ≥ vocab_size are
    left out of the distribution). Returns (logprobs, entropy), fp32 (fp64 for fp64 logits).
    log-probs carry a gradient into the logits; entropy does too when entropy_grad=True,
    otherwise it is returned detached. The input logits are never modified.
    """
    temperature, vocab_size = _check(logits, target_ids, temperature, group, chunk_size, vocab_size)
    target_ids = target_ids.to(device=logits.device, dtype=torch.long)
    logp, entropy = _VocabParallelLogprobEntropy.apply(
        logits, target_ids, temperature, group, chunk_size, vocab_size, entropy_grad
    )
    return logp, (entropy if entropy_grad else entropy.detach())
