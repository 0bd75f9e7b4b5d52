import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from megatron_hapo.algorithms import informative_groups, overlong_penalty

from .strategies import grouped_rewards


def test_overlong_penalty_hand_worked():
    # L_max = 20, buffer 8: free up to 12, then linear down to −factor at 20
    pen = overlong_penalty([0, 12, 13, 16, 20], max_len=20, buffer_len=8, factor=0.5)
    assert pen.tolist() == pytest.approx([0.0, 0.0, -0.5 / 8, -0.25, -0.5])


@given(st.lists(st.integers(0, 64), min_size=1, max_size=20), st.integers(0, 64), st.floats(0, 2))
def test_overlong_penalty_reference(lengths, buffer_len, factor):
    max_len = 64
    pen = overlong_penalty(torch.tensor(lengths), max_len, buffer_len, factor)
    for length, p in zip(lengths, pen.tolist()):
        free = max_len - buffer_len
        want = 0.0 if buffer_len == 0 or length <= free else (free - length) / buffer_len * factor
        assert p == pytest.approx(want, abs=1e-6)
        assert -factor - 1e-6 <= p <= 0


def test_overlong_penalty_rejects_lengths_past_the_cap():
    with pytest.raises(ValueError, match="lengths"):
        overlong_penalty([5, 30], max_len=20, buffer_len=4)


def test_informative_groups_hand_worked():
    keep = informative_groups([1, 1, 0, 1, 0, 0, 1], ["a", "a", "b", "b", "c", "c", "d"])
    assert keep.tolist() == [False, False, True, True, False, False, True]


@given(grouped_rewards())
def test_informative_groups_reference(data):
    rewards, _, groups = data
    keep = informative_groups(rewards, groups)
    for k, g in zip(keep.tolist(), groups):
        vals = [r for r, x in zip(rewards, groups) if x == g]
        assert k == (len(set(vals)) > 1 or len(vals) == 1)
