"""Input validation shared by the algorithm functions: errors name the argument at fault."""
from __future__ import annotations

import torch


def as_tensor(name: str, value, dtype=None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value if dtype is None else value.to(dtype)
    try:
        return torch.as_tensor(value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected a tensor or a sequence of numbers, got {type(value).__name__}") from exc


def same_shape(**tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    ref_name, ref = items[0]
    for name, t in items[1:]:
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match {ref_name} shape {tuple(ref.shape)}")


def finite(name: str, t: torch.Tensor, where: torch.Tensor | None = None) -> None:
    bad = ~torch.isfinite(t)
    if where is not None:
        bad = bad & where
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: non-finite value {t[idx].item()} at index {idx}")


def one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: unknown value {value!r}; expected one of {', '.join(map(repr, allowed))}")


def as_mask(name: str, mask, like: torch.Tensor) -> torch.Tensor:
    m = as_tensor(name, mask)
    if tuple(m.shape) != tuple(like.shape):
        raise ValueError(f"{name}: shape {tuple(m.shape)} does not match the token tensor shape {tuple(like.shape)}")
    if m.dtype == torch.bool:
        return m.to(like.device)
    if m.is_floating_point() and not bool(((m == 0) | (m == 1)).all()):
        raise ValueError(f"{name}: a mask must hold only 0 and 1 (or be bool)")
    return m.to(device=like.device) != 0


def group_index(group_ids, n: int, device=None) -> tuple[torch.Tensor, int]:
    """Maps arbitrary group ids (ints, strings, a tensor) to 0..G-1 in order of first appearance,
    as a tensor on `device` (the rewards' device)."""
    if isinstance(group_ids, torch.Tensor):
        if group_ids.dim() != 1:
            raise ValueError(f"group_ids: expected one id per sequence (1-D), got shape {tuple(group_ids.shape)}")
        ids = group_ids.tolist()
    else:
        ids = list(group_ids)
    if len(ids) != n:
        raise ValueError(f"group_ids: {len(ids)} ids for {n} sequences")
    table: dict = {}
    index = [table.setdefault(g, len(table)) for g in ids]
    return torch.tensor(index, dtype=torch.long, device=device), len(table)


def group_all_equal(values: torch.Tensor, index: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Per element: True where every value of its group (by index) is the same."""
    hi = torch.full((n_groups,), -torch.inf, dtype=values.dtype, device=values.device)
    lo = torch.full((n_groups,), torch.inf, dtype=values.dtype, device=values.device)
    hi = hi.scatter_reduce(0, index, values, "amax")
    lo = lo.scatter_reduce(0, index, values, "amin")
    return (hi == lo)[index]


def group_sizes(index: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Per element: the size of its group."""
    return torch.zeros(n_groups, dtype=torch.long, device=index.device).index_add_(0, index, torch.ones_like(index))[index]
