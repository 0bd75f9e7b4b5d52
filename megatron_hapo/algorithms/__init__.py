"""HAPO, DAPO and GRPO as pure tensor functions: no torch.distributed, Megatron or vLLM here.

The names follow the paper (arXiv 2509.16591) and docs/HAPO.md:
  A  adaptive_temperature            per-token sampling temperature from entropy
  B  token_group_advantages          token-level group-average advantage (GRPO fallback)
  C  redistribute_advantages         differential advantage redistribution
  D  adaptive_clip_bounds            asymmetric entropy-adaptive clipping
and the shared pieces: entropy_stats / normalized_entropy, grpo_advantages, policy_loss,
overlong_penalty, informative_groups.
"""
from .advantages import grpo_advantages, token_group_advantages, token_group_advantages_with_fallback
from .dapo import informative_groups, overlong_penalty
from .entropy import SIGN_MODES, EntropyStats, adaptive_temperature, entropy_stats, normalized_entropy
from .loss import (
    AGGREGATIONS,
    adaptive_clip_bounds,
    aggregate_loss,
    policy_loss,
    ppo_token_losses,
    redistribute_advantages,
    ROLLOUT_CORRECTIONS,
    rollout_correction_weights,
    truncated_is_weights,
    weighted_token_losses,
)
from .objectives import (
    AlgorithmConfig,
    PolicyLoss,
    compute_advantages,
    compute_policy_loss,
    logprob_mismatch,
    logprob_mismatch_sums,
    loss_entropy_scale,
)

__all__ = [
    "AGGREGATIONS",
    "SIGN_MODES",
    "AlgorithmConfig",
    "PolicyLoss",
    "EntropyStats",
    "adaptive_clip_bounds",
    "adaptive_temperature",
    "aggregate_loss",
    "compute_advantages",
    "compute_policy_loss",
    "entropy_stats",
    "grpo_advantages",
    "informative_groups",
    "logprob_mismatch",
    "logprob_mismatch_sums",
    "loss_entropy_scale",
    "normalized_entropy",
    "overlong_penalty",
    "policy_loss",
    "ppo_token_losses",
    "redistribute_advantages",
    "token_group_advantages",
    "token_group_advantages_with_fallback",
    "ROLLOUT_CORRECTIONS",
    "rollout_correction_weights",
    "truncated_is_weights",
    "weighted_token_losses",
]
