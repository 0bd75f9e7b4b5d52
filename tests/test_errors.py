"""Bad input gets an error that names the argument; never a silent wrong number."""
import pytest
import torch

from megatron_hapo.algorithms import (
    AlgorithmConfig,
    EntropyStats,
    adaptive_clip_bounds,
    adaptive_temperature,
    entropy_stats,
    grpo_advantages,
    informative_groups,
    normalized_entropy,
    overlong_penalty,
    policy_loss,
    redistribute_advantages,
    token_group_advantages,
)

ONE = torch.ones(2, 3)
STATS = EntropyStats(0.0, 1.0, 1.0, -1.0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: entropy_stats(ONE, torch.zeros(2, 3)), "mask: selects no tokens"),
        (lambda: entropy_stats(ONE, torch.ones(3, 2)), "mask: shape"),
        (lambda: entropy_stats(torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 2)), "entropy: non-finite"),
        (lambda: entropy_stats(torch.ones(2, 3, dtype=torch.long), ONE), "entropy: expected a floating"),
        (lambda: entropy_stats(ONE, ONE, pivot=1.5), "pivot"),
        (lambda: entropy_stats(ONE, torch.full((2, 3), 0.5)), "mask: a mask must hold only 0 and 1"),
        (lambda: normalized_entropy(ONE, STATS, sign_mode="mirror"), "sign_mode: unknown value 'mirror'"),
        (lambda: normalized_entropy(ONE, (0, 1, 1, -1)), "stats: expected EntropyStats"),
        (lambda: adaptive_temperature(ONE, STATS, sign_mode="x"), "sign_mode"),
        (lambda: adaptive_temperature(ONE, None, sign_mode="x"), "sign_mode"),
        (lambda: adaptive_temperature(ONE, STATS, base_temperature=0), "base_temperature"),
        (lambda: adaptive_temperature(ONE, STATS, tau=1.5), "tau"),
        (lambda: EntropyStats(0.0, 0.0, 1.0, -1.0), "EntropyStats.sigma"),
        (lambda: EntropyStats(float("nan"), 1.0, 1.0, -1.0), "EntropyStats.q"),
        (lambda: EntropyStats.from_dict({"q": 0.0}), "missing fields"),
        (lambda: token_group_advantages([1.0, float("nan")], [1, 2], [0, 0]), "rewards: non-finite"),
        (lambda: token_group_advantages([1.0, 0.0], [1, 2, 3], [0, 0]), "lengths: expected 2"),
        (lambda: token_group_advantages([1.0, 0.0], [1, -2], [0, 0]), "lengths: must be non-negative"),
        (lambda: token_group_advantages([1.0, 0.0], [1, 2], [0]), "group_ids: 1 ids for 2 sequences"),
        (lambda: token_group_advantages([[1.0, 0.0]], [1, 2], [0, 0]), "rewards: expected one reward"),
        (lambda: token_group_advantages([1.0, 0.0], [1, 2], [0, 0], fallback_threshold=0), "fallback_threshold"),
        (lambda: grpo_advantages([1.0, float("inf")], [0, 0]), "rewards: non-finite"),
        (lambda: grpo_advantages("abc", [0, 0, 0]), "rewards"),
        (lambda: informative_groups([1.0, float("nan")], [0, 0]), "rewards: non-finite"),
        (lambda: adaptive_clip_bounds(ONE, eps_low=1.2), "eps_low"),
        (lambda: adaptive_clip_bounds(ONE, alpha=-1), "alpha"),
        (lambda: redistribute_advantages(torch.ones(2), ONE, torch.ones(3, 2), 0.2, 0.28), "ratio: shape"),
        (lambda: redistribute_advantages(torch.ones(3), ONE, ONE, 0.2, 0.28), "advantages: shape"),
        (lambda: policy_loss(ONE, ONE, torch.ones(2), ONE, agg="sum"), "agg: unknown value 'sum'"),
        (lambda: policy_loss(ONE, torch.ones(2, 4), torch.ones(2), ONE), "old_logp: shape"),
        (lambda: policy_loss(ONE, ONE, torch.ones(2), torch.ones(2, 4)), "mask: shape"),
        (lambda: policy_loss(ONE, ONE, torch.ones(2), ONE, eps_low=torch.ones(4)), "eps_low: shape"),
        (lambda: policy_loss(ONE, ONE, torch.ones(2), ONE, clip_ratio_c=0.5), "clip_ratio_c"),
        (lambda: policy_loss(ONE, ONE, torch.ones(2), ONE, normalizer=0), "normalizer"),
        (lambda: overlong_penalty([1, 2], max_len=10, buffer_len=20), "buffer_len"),
        (lambda: overlong_penalty([1, -2], max_len=10, buffer_len=2), "lengths: must be non-negative"),
        (lambda: AlgorithmConfig(name="ppo"), "algorithm.name"),
        (lambda: AlgorithmConfig(agg="mean"), "algorithm.agg"),
        (lambda: AlgorithmConfig(rollout_correction="is"), "rollout_correction"),
        (lambda: AlgorithmConfig(loss_stats="global"), "loss_stats"),
    ],
)
def test_bad_input_names_the_culprit(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_empty_mask_loss_is_zero_not_nan():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss = policy_loss(logp, torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and bool((logp.grad == 0).all())
