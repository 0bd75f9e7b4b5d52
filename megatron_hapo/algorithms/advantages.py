"""Sequence advantages: HAPO's token-level group average (HAPO.md §B) and GRPO's baseline.

Both return one advantage per sequence; the loss broadcasts it over the sequence's tokens.
Computed in float64; the result has the rewards' floating dtype (float32 for integer rewards).
"""
from __future__ import annotations

import torch

from ._checks import as_tensor, finite, group_all_equal, group_index


def _rewards(rewards) -> tuple[torch.Tensor, torch.dtype]:
    r = as_tensor("rewards", rewards)
    if r.dim() != 1:
        raise ValueError(f"rewards: expected one reward per sequence (1-D), got shape {tuple(r.shape)}")
    out_dtype = r.dtype if r.is_floating_point() else torch.float32
    r = r.to(torch.float64)
    finite("rewards", r)
    return r, out_dtype


def _group_sum(values: torch.Tensor, index: torch.Tensor, n_groups: int) -> torch.Tensor:
    return torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, index, values)


def _grpo(r: torch.Tensor, index: torch.Tensor, n_groups: int, eps: float) -> torch.Tensor:
    count = _group_sum(torch.ones_like(r), index, n_groups)
    mean = _group_sum(r, index, n_groups) / count
    dev = r - mean[index]
    var = _group_sum(dev * dev, index, n_groups) / (count - 1).clamp(min=1)
    std = var.sqrt()
    single = count == 1  # verl's convention: a group of one gets mean 0, std 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    adv = (r - mean[index]) / (std[index] + eps)
    return torch.where(group_all_equal(r, index, n_groups) & ~single[index], torch.zeros_like(adv), adv)


def grpo_advantages(rewards, group_ids, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: A_i = (R_i − mean_g R) / (std_g R + eps), unbiased std; a group of one: mean 0, std 1."""
    r, out_dtype = _rewards(rewards)
    index, n_groups = group_index(group_ids, r.numel(), r.device)
    return _grpo(r, index.to(r.device), n_groups, eps).to(out_dtype)


def token_group_advantages(
    rewards, lengths, group_ids, fallback_threshold: float | None = 5.0, eps: float = 1e-6
) -> torch.Tensor:
    """HAPO B: group mean and population std over the group's tokens (response i counts L_i times).

    The token advantages of a group then sum to zero whatever the lengths. A group in which any
    response with at least one token gets |A_i| ≥ fallback_threshold uses the GRPO advantage
    instead (the released code's rule, decided on real tokens only); None disables the fallback.
    """
    return token_group_advantages_with_fallback(rewards, lengths, group_ids, fallback_threshold, eps)[0]


def token_group_advantages_with_fallback(
    rewards, lengths, group_ids, fallback_threshold: float | None = 5.0, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """token_group_advantages, plus a per-sequence bool: True where its group fell back to GRPO."""
    r, out_dtype = _rewards(rewards)
    lengths = as_tensor("lengths", lengths)
    if lengths.dim() != 1 or lengths.numel() != r.numel():
        raise ValueError(f"lengths: expected {r.numel()} lengths (one per reward), got shape {tuple(lengths.shape)}")
    lengths = lengths.to(device=r.device, dtype=torch.float64)
    finite("lengths", lengths)
    if bool((lengths < 0).any()):
        raise ValueError(f"lengths: must be non-negative, got {lengths.min().item()}")
    if fallback_threshold is not None and not fallback_threshold > 0:
        raise ValueError(f"fallback_threshold: must be positive or None, got {fallback_threshold}")
    index, n_groups = group_index(group_ids, r.numel(), r.device)
    index = index.to(r.device)

    tokens = _group_sum(lengths, index, n_groups)
    safe = tokens.clamp(min=1.0)
    mean = _group_sum(lengths * r, index, n_groups) / safe
    dev = r - mean[index]
    std = (_group_sum(lengths * dev * dev, index, n_groups) / safe).sqrt()
    adv = dev / (std[index] + eps)
    # All-equal groups and groups with no tokens at all carry no signal: exactly zero.
    adv = torch.where(group_all_equal(r, index, n_groups) | (tokens[index] == 0), torch.zeros_like(adv), adv)

    fallback = torch.zeros_like(r, dtype=torch.bool)
    if fallback_threshold is not None:
        big = ((adv.abs() >= fallback_threshold) & (lengths > 0)).to(torch.float64)
        fallback = _group_sum(big, index, n_groups)[index] > 0
        if bool(fallback.any()):
            adv = torch.where(fallback, _grpo(r, index, n_groups, eps), adv)
    return adv.to(out_dtype), fallback
