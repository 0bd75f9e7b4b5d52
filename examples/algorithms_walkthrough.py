"""One HAPO step on a hand-made batch, printing every intermediate quantity.

    .venv/bin/python examples/algorithms_walkthrough.py
"""
import torch

import megatron_hapo.algorithms as A

torch.set_printoptions(precision=3, sci_mode=False)
gen = torch.Generator().manual_seed(0)

# 2 prompts x 3 responses, up to 5 tokens each
groups = ["p0", "p0", "p0", "p1", "p1", "p1"]
lengths = torch.tensor([5, 2, 4, 3, 5, 1])
mask = torch.arange(5)[None, :] < lengths[:, None]
rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
old_entropy = torch.rand(6, 5, generator=gen) * 3
old_logp = -torch.rand(6, 5, generator=gen) * 2
logp = old_logp + 0.3 * torch.randn(6, 5, generator=gen)

cfg = A.AlgorithmConfig.preset("hapo")
stats = A.entropy_stats(old_entropy, mask, cfg.pivot)
print("entropy stats:", stats)
h = A.normalized_entropy(old_entropy, stats, cfg.sign_mode)
print("h~ (valid tokens):\n", torch.where(mask, h, torch.nan))
print("next step's sampling temperatures:\n", torch.where(mask, A.adaptive_temperature(old_entropy, stats), torch.nan))
adv = A.token_group_advantages(rewards, lengths, groups)
print("token-level group advantages:", adv, "  GRPO would give:", A.grpo_advantages(rewards, groups))
low, high = A.adaptive_clip_bounds(h, cfg.eps_low, cfg.eps_high, cfg.alpha)
ratio = torch.exp(logp - old_logp)
a_hat = A.redistribute_advantages(adv, h, ratio, low, high, cfg.beta)
print("eps_low(t):\n", torch.where(mask, low, torch.nan), "\neps_high(t):\n", torch.where(mask, high, torch.nan))
print("redistributed advantages:\n", torch.where(mask, a_hat, torch.nan))
loss, metrics = A.compute_policy_loss(cfg, logp, old_logp, adv, mask, h_hat=h)
print("loss:", loss.item(), {k: int(v) for k, v in metrics.items()})
