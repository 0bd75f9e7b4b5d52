"""Hypothesis strategies for token batches."""
import torch
from hypothesis import strategies as st

entropy_value = st.one_of(
    st.floats(min_value=0.0, max_value=12.0, allow_nan=False),
    st.floats(min_value=1e-12, max_value=1e-3),
)


@st.composite
def token_batch(draw, min_valid=1):
    """(entropy [B, T] float64, mask [B, T] bool) with at least min_valid valid tokens."""
    b = draw(st.integers(1, 5))
    t = draw(st.integers(1, 9))
    ent = draw(st.lists(entropy_value, min_size=b * t, max_size=b * t))
    mask = draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))
    if sum(mask) < min_valid:
        mask[: max(min_valid, 1)] = [True] * max(min_valid, 1)
    return torch.tensor(ent, dtype=torch.float64).view(b, t), torch.tensor(mask).view(b, t)


@st.composite
def grouped_rewards(draw):
    """(rewards, lengths, group_ids) with 1..4 groups of 1..6 responses; ids may be strings."""
    n_groups = draw(st.integers(1, 4))
    sizes = draw(st.lists(st.integers(1, 6), min_size=n_groups, max_size=n_groups))
    as_str = draw(st.booleans())
    groups = [f"p{g}" if as_str else g * 7 for g, s in enumerate(sizes) for _ in range(s)]
    order = draw(st.permutations(range(len(groups))))
    groups = [groups[i] for i in order]
    reward = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 0.5]), st.floats(-2, 2).map(lambda x: round(x, 3)))
    rewards = draw(st.lists(reward, min_size=len(groups), max_size=len(groups)))
    lengths = draw(st.lists(st.integers(0, 50), min_size=len(groups), max_size=len(groups)))
    return rewards, lengths, groups
