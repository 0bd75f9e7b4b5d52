import math

import pytest
import torch
from hypothesis import assume, given

from megatron_hapo.algorithms import grpo_advantages, token_group_advantages, token_group_advantages_with_fallback

from . import reference as ref
from .strategies import grouped_rewards


def test_hand_worked_token_group_advantage():
    # one group: R = (1, 0), L = (1, 3): μ = 1/4, σ = sqrt((1·(3/4)² + 3·(1/4)²)/4) = sqrt(3)/4
    adv = token_group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([1, 3]), [0, 0], eps=0.0)
    sigma = math.sqrt(3) / 4
    assert adv.tolist() == pytest.approx([0.75 / sigma, -0.25 / sigma])
    assert adv[0] * 1 + adv[1] * 3 == pytest.approx(0.0, abs=1e-6)


def test_hand_worked_grpo():
    adv = grpo_advantages([1.0, 0.0, 0.0, 1.0, 3.0], ["a", "a", "a", "b", "c"], eps=0.0)
    sd = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    assert adv.tolist() == pytest.approx([(2 / 3) / sd, -(1 / 3) / sd, -(1 / 3) / sd, 1.0, 3.0])


@given(grouped_rewards())
def test_token_group_matches_reference(data):
    rewards, lengths, groups = data
    got = token_group_advantages(torch.tensor(rewards, dtype=torch.float64), torch.tensor(lengths), groups)
    want = ref.token_group_advantages(rewards, lengths, groups)
    assert got.tolist() == pytest.approx(want, rel=1e-9, abs=1e-9)


@given(grouped_rewards())
def test_grpo_matches_reference(data):
    rewards, _, groups = data
    got = grpo_advantages(torch.tensor(rewards, dtype=torch.float64), groups)
    assert got.tolist() == pytest.approx(ref.grpo_advantages(rewards, groups), rel=1e-9, abs=1e-9)


@given(grouped_rewards())
def test_token_advantages_sum_to_zero_per_group(data):
    rewards, lengths, groups = data
    adv, fallback = token_group_advantages_with_fallback(torch.tensor(rewards, dtype=torch.float64), lengths, groups)
    for g in set(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        if fallback[idx[0]]:
            continue
        scale = max(1.0, max(abs(adv[i].item()) * lengths[i] for i in idx))
        assert sum(adv[i].item() * lengths[i] for i in idx) == pytest.approx(0.0, abs=1e-9 * scale)


@given(grouped_rewards())
def test_all_equal_groups_get_zero(data):
    _, lengths, groups = data
    rewards = [1.0 if isinstance(g, str) and g.endswith("0") or g == 0 else 0.3 for g in groups]
    for fn in (lambda: token_group_advantages(rewards, lengths, groups), lambda: grpo_advantages(rewards, groups)):
        adv = fn()
        sizes = {g: groups.count(g) for g in groups}
        for a, g in zip(adv.tolist(), groups):
            if sizes[g] > 1:
                assert a == 0.0


def test_fallback_fires_exactly_at_threshold():
    # G = 2, L = (n, 1), R = (1, 0): |A_2| = sqrt(n) (σ = sqrt(n)/(n+1), μ = n/(n+1)).
    for n, fires in ((24, False), (25, True), (26, True)):
        adv, fb = token_group_advantages_with_fallback([1.0, 0.0], [n, 1], [0, 0], fallback_threshold=5.0, eps=0.0)
        assert bool(fb.all()) == fires, n
        if fires:
            assert adv.tolist() == pytest.approx(grpo_advantages([1.0, 0.0], [0, 0], eps=0.0).tolist())
        else:
            assert adv[1].item() == pytest.approx(-math.sqrt(n))
    no_fb = token_group_advantages([1.0, 0.0], [100, 1], [0, 0], fallback_threshold=None, eps=0.0)
    assert no_fb[1].item() == pytest.approx(-10.0)


def test_fallback_ignores_empty_responses():
    # The third response has no tokens; its (large) advantage must not trigger the fallback.
    rewards, lengths = [1.0, 0.0, 5.0], [10, 10, 0]
    adv, fb = token_group_advantages_with_fallback(rewards, lengths, [0, 0, 0], eps=0.0)
    assert not bool(fb.any())
    assert abs(adv[2].item()) > 5.0
    assert adv[0].item() == pytest.approx(-adv[1].item())


def test_fallback_is_per_group():
    adv, fb = token_group_advantages_with_fallback([1.0, 0.0, 1.0, 0.0], [100, 1, 2, 2], ["x", "x", "y", "y"])
    assert fb.tolist() == [True, True, False, False]
    assert adv[2:].tolist() == pytest.approx([1.0, -1.0], abs=1e-5)


@given(grouped_rewards())
def test_order_and_group_labels_do_not_matter(data):
    rewards, lengths, groups = data
    adv = token_group_advantages(rewards, lengths, groups)
    perm = list(range(len(rewards)))[::-1]
    relabeled = [f"group-{g}" for g in groups]
    adv2 = token_group_advantages([rewards[i] for i in perm], [lengths[i] for i in perm], [relabeled[i] for i in perm])
    assert adv2.tolist() == pytest.approx([adv[i].item() for i in perm], abs=1e-6)


def test_dtypes():
    assert token_group_advantages([1, 0], [2, 3], [0, 0]).dtype == torch.float32
    assert grpo_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), [0, 0]).dtype == torch.float64
    assert token_group_advantages(torch.tensor([1, 0]), torch.tensor([2, 3]), torch.tensor([4, 4])).shape == (2,)


@given(grouped_rewards())
def test_equal_lengths_give_population_zscore(data):
    rewards, _, groups = data
    assume(len(groups) > 0)
    lengths = [7] * len(rewards)
    tok = token_group_advantages(rewards, lengths, groups, fallback_threshold=None, eps=0.0)
    for g in set(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        vals = [rewards[i] for i in idx]
        if len(set(vals)) == 1:
            continue
        mu = sum(vals) / len(vals)
        pop_sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / len(vals))
        for i in idx:
            assert tok[i].item() == pytest.approx((rewards[i] - mu) / pop_sd, rel=1e-5, abs=1e-5)
