"""The trainer-facing composition: presets, switches, metrics, loss-side entropy modes."""
import pytest
import torch

from megatron_hapo.algorithms import (
    AlgorithmConfig,
    adaptive_clip_bounds,
    compute_advantages,
    compute_policy_loss,
    entropy_stats,
    grpo_advantages,
    loss_entropy_scale,
    normalized_entropy,
    policy_loss,
    redistribute_advantages,
    token_group_advantages,
    truncated_is_weights,
)


def batch(seed=0, b=6, t=9):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    logp = old + (torch.rand(b, t, generator=g, dtype=torch.float64) - 0.5)
    ent = torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(b, t, generator=g) > 0.2
    mask[:, 0] = True
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    return logp, old, ent, mask, adv


def test_presets():
    hapo, dapo, grpo = (AlgorithmConfig.preset(n) for n in ("hapo", "dapo", "grpo"))
    assert hapo.adaptive_temperature and hapo.token_level_advantage and hapo.redistribute and hapo.adaptive_clip
    assert not any((dapo.adaptive_temperature, dapo.token_level_advantage, dapo.redistribute, dapo.adaptive_clip))
    assert (dapo.eps_low, dapo.eps_high, dapo.clip_ratio_c, dapo.agg) == (0.2, 0.28, 10.0, "token-mean")
    assert grpo.eps_high == 0.2
    # one component off at a time: the paper's ablation
    assert not AlgorithmConfig.preset("hapo", redistribute=False).redistribute
    with pytest.raises(ValueError, match="name='hapo'"):
        AlgorithmConfig.preset("dapo", adaptive_clip=True)


def test_hapo_loss_composes_c_and_d():
    logp, old, ent, mask, adv = batch()
    cfg = AlgorithmConfig.preset("hapo")
    stats = entropy_stats(ent, mask)
    h = loss_entropy_scale(cfg, mask, step_stats=stats, old_entropy=ent)
    loss, metrics = compute_policy_loss(cfg, logp, old, adv, mask, h_hat=h)
    low, high = adaptive_clip_bounds(h)
    a_hat = redistribute_advantages(adv, h, torch.exp(logp - old), low, high)
    assert loss.item() == pytest.approx(policy_loss(logp, old, a_hat, mask, low, high).item(), rel=1e-12)
    assert metrics["tokens"].item() == mask.sum().item()
    assert 0 < metrics["adv_redistributed"].item() <= mask.sum().item()
    assert 0 < metrics["bounds_adapted"].item() <= mask.sum().item()


def test_dapo_loss_is_plain_dual_clip():
    logp, old, _, mask, adv = batch(1)
    loss, metrics = compute_policy_loss(AlgorithmConfig.preset("dapo"), logp, old, adv, mask)
    assert loss.item() == pytest.approx(policy_loss(logp, old, adv, mask, 0.2, 0.28).item(), rel=1e-12)
    assert "adv_redistributed" not in metrics


def test_micro_batch_current_uses_current_entropy_stats():
    logp, old, ent, mask, _ = batch(2)
    cfg = AlgorithmConfig.preset("hapo", loss_stats="micro_batch_current")
    h = loss_entropy_scale(cfg, mask, current_entropy=ent)
    assert torch.equal(h, normalized_entropy(ent, entropy_stats(ent, mask)))
    with pytest.raises(ValueError, match="current_entropy"):
        loss_entropy_scale(cfg, mask, old_entropy=ent)


def test_tis_correction():
    logp, old, _, mask, adv = batch(3)
    behaviour = old + 0.3 * torch.randn_like(old)
    cfg = AlgorithmConfig.preset("dapo", rollout_correction="tis")
    loss, metrics = compute_policy_loss(cfg, logp, old, adv, mask, behaviour_logp=behaviour)
    w = truncated_is_weights(old, behaviour, mask, 2.0)
    assert loss.item() == pytest.approx(policy_loss(logp, old, adv, mask, weights=w).item(), rel=1e-12)
    with pytest.raises(ValueError, match="behaviour_logp"):
        compute_policy_loss(cfg, logp, old, adv, mask)


def test_compute_advantages_switch():
    r, lens, g = [1.0, 0.0, 1.0, 1.0], [3, 9, 1, 4], [0, 0, 1, 1]
    adv, _ = compute_advantages(AlgorithmConfig.preset("hapo"), r, lens, g)
    assert torch.equal(adv, token_group_advantages(r, lens, g))
    adv, fb = compute_advantages(AlgorithmConfig.preset("dapo"), r, lens, g)
    assert torch.equal(adv, grpo_advantages(r, g)) and not bool(fb.any())


def test_policy_loss_declares_its_inputs_and_normalizer():
    from megatron_hapo.algorithms import PolicyLoss

    assert PolicyLoss(AlgorithmConfig.preset("dapo")).inputs == ("advantages", "old_logp")
    assert PolicyLoss(AlgorithmConfig.preset("hapo")).inputs == ("advantages", "old_logp", "h_hat")
    assert PolicyLoss(AlgorithmConfig.preset("hapo", loss_stats="micro_batch_current")).inputs == ("advantages", "old_logp")
    tis = PolicyLoss(AlgorithmConfig.preset("dapo", rollout_correction="tis"))
    assert tis.inputs == ("advantages", "old_logp", "behaviour_logp")
    with pytest.raises(ValueError, match="needs \\['behaviour_logp'\\] in the batch"):
        tis.check({"advantages": None, "old_logp": None})
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    assert PolicyLoss(AlgorithmConfig.preset("dapo")).normalizer(mask).item() == 3  # tokens
    assert PolicyLoss(AlgorithmConfig.preset("grpo")).normalizer(mask).item() == 2  # non-empty sequences


def test_policy_loss_sum_over_the_normalizer_is_the_loss_and_tis_stats():
    from megatron_hapo.algorithms import PolicyLoss

    g = torch.Generator().manual_seed(3)
    logp, old = -torch.rand(3, 5, generator=g, dtype=torch.float64), -torch.rand(3, 5, generator=g, dtype=torch.float64)
    behaviour = old - torch.tensor([[1.0, 0.0, 0.2, -0.3, 2.0]] * 3, dtype=torch.float64)  # log w = 1 and 2: truncated at 2
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    adv = torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64)
    cfg = AlgorithmConfig.preset("dapo", rollout_correction="tis", tis_cap=2.0)
    loss_sum, count, sums = PolicyLoss(cfg)(logp, torch.zeros_like(logp), mask,
                                            {"advantages": adv, "old_logp": old, "behaviour_logp": behaviour})
    w = truncated_is_weights(old, behaviour, mask, 2.0)
    assert (loss_sum / count).item() == pytest.approx(policy_loss(logp, old, adv, mask, weights=w).item(), rel=1e-12)
    m = PolicyLoss(cfg).metrics({k: float(v) for k, v in sums.items()})
    assert m["rollout_correction_hit_frac"] == pytest.approx(5 / 13)  # columns 0 and 4 (log w ≥ log 2): 5 valid tokens
    assert m["rollout_correction_weight_mean"] == pytest.approx((w.sum() / 13).item())
    ratio = torch.exp(old - behaviour)[mask]
    assert m["rollout_correction_ratio_mean"] == pytest.approx(ratio.mean().item())
