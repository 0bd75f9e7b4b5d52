"""DAPO's reward shaping and dynamic-sampling filter, shared by every algorithm on the trainer."""
from __future__ import annotations

import torch

from ._checks import as_tensor, finite, group_all_equal, group_index, group_sizes


def overlong_penalty(lengths, max_len: int, buffer_len: int, factor: float = 1.0) -> torch.Tensor:
    """Soft overlong punishment: 0 up to max_len − buffer_len, then linear down to −factor at max_len.

    buffer_len = 0 disables it (all zeros). A length above max_len is a caller bug (the engine caps
    generation at max_len) and raises.
    """
    lengths = as_tensor("lengths", lengths)
    if lengths.dim() != 1:
        raise ValueError(f"lengths: expected one length per sequence (1-D), got shape {tuple(lengths.shape)}")
    if not max_len > 0:
        raise ValueError(f"max_len: must be positive, got {max_len}")
    if not 0 <= buffer_len <= max_len:
        raise ValueError(f"buffer_len: must lie in [0, max_len={max_len}], got {buffer_len}")
    if not factor >= 0:
        raise ValueError(f"factor: must be non-negative, got {factor}")
    lengths = lengths.to(torch.float64)
    finite("lengths", lengths)
    if bool((lengths < 0).any()):
        raise ValueError(f"lengths: must be non-negative, got {lengths.min().item()}")
    if bool((lengths > max_len).any()):
        raise ValueError(f"lengths: {lengths.max().item():.0f} exceeds max_len={max_len}")
    if buffer_len == 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    expected = max_len - buffer_len
    penalty = (expected - lengths).clamp(max=0.0) / buffer_len * factor
    return penalty.to(torch.float32)


def informative_groups(rewards, group_ids) -> torch.Tensor:
    """Per sequence: True where its group's rewards are not all equal (DAPO dynamic sampling keeps
    those). A group of one is kept, as in DAPO's code: GRPO gives it a non-zero advantage."""
    r = as_tensor("rewards", rewards)
    if r.dim() != 1:
        raise ValueError(f"rewards: expected one reward per sequence (1-D), got shape {tuple(r.shape)}")
    r = r.to(torch.float64)
    finite("rewards", r)
    index, n_groups = group_index(group_ids, r.numel(), r.device)
    index = index.to(r.device)
    return ~group_all_equal(r, index, n_groups) | (group_sizes(index, n_groups) == 1)
