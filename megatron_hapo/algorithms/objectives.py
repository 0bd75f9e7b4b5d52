"""The algorithms as the trainer sees them: one config, HAPO/DAPO/GRPO presets, one loss call.

HAPO is DAPO plus four switches (A–D); each can be turned off alone, which is the paper's
ablation. Dynamic sampling and overlong shaping are trainer settings shared by all three.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ._checks import as_mask, one_of
from .advantages import grpo_advantages, token_group_advantages_with_fallback
from .entropy import SIGN_MODES, EntropyStats, entropy_stats, normalized_entropy
from .loss import (AGGREGATIONS, ROLLOUT_CORRECTIONS, adaptive_clip_bounds, aggregate_loss, redistribute_advantages,
                   rollout_correction_weights, weighted_token_losses)

ALGORITHMS = ("hapo", "dapo", "grpo")
LOSS_STATS = ("step_old", "micro_batch_current")


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
    name: str = "hapo"  # hapo | dapo | grpo: the preset the other fields start from
    # HAPO's four components (HAPO.md §A–§D).
    adaptive_temperature: bool = True  # A: a per-token sampling temperature from the token's entropy
    token_level_advantage: bool = True  # B: token-weighted group-average advantages
    redistribute: bool = True  # C: differential advantage redistribution by h̃
    adaptive_clip: bool = True  # D: asymmetric entropy-adaptive clip bounds
    tau: float = 0.05  # A's strength: T = T_base·(1 + τ·h̃); 0.05 as the released code (the paper's text: 0.1)
    beta: float = 1.0  # C's strength: A·(1 + β·h̃)
    alpha: float = 1.0  # D's strength: the bounds widen by α·|h̃|
    pivot: float = 0.8  # the entropy quantile that splits confident from uncertain tokens
    sign_mode: str = "signed"  # signed (the paper's intent) | released (the authors' code: low-entropy tokens heated too)
    fallback_threshold: Optional[float] = 5.0  # B: a group with |A| at or above this uses the GRPO advantage (null: never)
    loss_stats: str = "step_old"  # which h̃ the loss uses: step_old (old pass, step-wide statistics) | micro_batch_current (released)
    # PPO loss shared by all algorithms.
    eps_low: float = 0.2  # PPO clip, lower: 1 − eps_low
    eps_high: float = 0.28  # PPO clip, upper: 1 + eps_high (DAPO's clip-higher)
    clip_ratio_c: Optional[float] = 10.0  # dual-clip bound for negative advantages (null: off)
    agg: str = "token-mean"  # loss aggregation: token-mean | seq-mean-token-mean | seq-mean-token-sum
    # against the engine's recorded log-probs at the recorded temperature (null: off): tis (token IS,
    # truncated) | icepop (tokens whose ratio leaves [1/c, c] masked) | seq-tis (sequence IS, truncated)
    # | seq-mis (sequences whose ratio exceeds c masked) | geo-rs (geometric-mean rejection, band [1/c, c])
    rollout_correction: Optional[str] = None
    tis_cap: float = 2.0  # c, the threshold of rollout_correction: the truncation (tis, seq-tis), the band or mask bound

    def __post_init__(self):
        one_of("algorithm.name", self.name, ALGORITHMS)
        one_of("algorithm.sign_mode", self.sign_mode, SIGN_MODES)
        one_of("algorithm.loss_stats", self.loss_stats, LOSS_STATS)
        one_of("algorithm.agg", self.agg, AGGREGATIONS)
        if self.rollout_correction not in ROLLOUT_CORRECTIONS:
            raise ValueError(f"algorithm.rollout_correction: unknown value {self.rollout_correction!r}; expected null or "
                             f"one of {ROLLOUT_CORRECTIONS[1:]}")
        if self.rollout_correction is not None and not self.tis_cap > 1:
            raise ValueError(f"algorithm.tis_cap: the rollout correction's threshold c must be > 1, got {self.tis_cap}")
        if not 0 <= self.tau < 1:
            raise ValueError(f"algorithm.tau: must lie in [0, 1) so that temperatures stay positive, got {self.tau}")
        if not 0 <= self.eps_low < 1:
            raise ValueError(f"algorithm.eps_low: must lie in [0, 1), got {self.eps_low}")
        if not 0 <= self.pivot <= 1:
            raise ValueError(f"algorithm.pivot: the entropy quantile must lie in [0, 1], got {self.pivot}")
        for field in ("beta", "alpha", "eps_high", "tis_cap"):
            if not getattr(self, field) >= 0:
                raise ValueError(f"algorithm.{field}: must be non-negative, got {getattr(self, field)}")
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1:
            raise ValueError(f"algorithm.clip_ratio_c: must be > 1 or None, got {self.clip_ratio_c}")
        if self.name != "hapo" and self.uses_entropy:
            raise ValueError(f"algorithm.name={self.name!r} cannot enable HAPO components; use name='hapo'")

    @property
    def uses_entropy(self) -> bool:
        """Whether the loss needs h̃ (HAPO C or D)."""
        return self.redistribute or self.adaptive_clip

    @classmethod
    def preset(cls, name: str, **overrides) -> "AlgorithmConfig":
        """hapo: all four components; dapo: none of them; grpo: none, symmetric clip, per-sequence mean."""
        one_of("algorithm", name, ALGORITHMS)
        off = dict(adaptive_temperature=False, token_level_advantage=False, redistribute=False, adaptive_clip=False)
        base = {"hapo": {}, "dapo": off, "grpo": dict(off, eps_high=0.2, agg="seq-mean-token-mean")}[name]
        return cls(name=name, **{**base, **overrides})


def compute_advantages(cfg: AlgorithmConfig, rewards, lengths, group_ids):
    """Per-sequence advantages and a per-sequence bool of groups that fell back to GRPO."""
    if cfg.token_level_advantage:
        return token_group_advantages_with_fallback(rewards, lengths, group_ids, cfg.fallback_threshold)
    adv = grpo_advantages(rewards, group_ids)
    return adv, torch.zeros_like(adv, dtype=torch.bool)


def loss_entropy_scale(
    cfg: AlgorithmConfig,
    mask,
    step_stats: Optional[EntropyStats] = None,
    old_entropy: Optional[torch.Tensor] = None,
    current_entropy: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """h̃ for the loss side (C, D), or None when neither is on.

    step_old: h̃ of the old-policy entropies under the step-wide statistics.
    micro_batch_current: h̃ of the current policy's entropies under statistics of this micro-batch.
    """
    if not cfg.uses_entropy:
        return None
    if cfg.loss_stats == "step_old":
        if step_stats is None or old_entropy is None:
            raise ValueError("loss_stats='step_old' needs step_stats and old_entropy")
        return normalized_entropy(old_entropy, step_stats, cfg.sign_mode)
    if current_entropy is None:
        raise ValueError("loss_stats='micro_batch_current' needs current_entropy")
    ent = current_entropy.detach()
    stats = entropy_stats(ent, mask, cfg.pivot)
    return normalized_entropy(ent, stats, cfg.sign_mode)


def compute_policy_loss(
    cfg: AlgorithmConfig,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask,
    h_hat: Optional[torch.Tensor] = None,
    normalizer=None,
    behaviour_logp: Optional[torch.Tensor] = None,
):
    """The loss of one micro-batch, and metric sums to be reduced across micro-batches and ranks.

    Returns (loss, metrics) where metrics holds float64 tensors: tokens, clip_low, clip_high,
    clip_dual, adv_redistributed, bounds_adapted, rc_weight, rc_ratio, rc_hit (sums over valid tokens).
    Rollout-correction weights multiply the per-token loss exactly as `policy_loss(..., weights=)` does.
    """
    mask = as_mask("mask", mask, logp)
    eps_low, eps_high = cfg.eps_low, cfg.eps_high
    adv = advantages
    metrics = {}
    if cfg.uses_entropy and h_hat is None:
        raise ValueError(f"algorithm {cfg.name!r} with redistribute/adaptive_clip needs h_hat")
    if cfg.adaptive_clip:
        eps_low, eps_high = adaptive_clip_bounds(h_hat, cfg.eps_low, cfg.eps_high, cfg.alpha)
        metrics["bounds_adapted"] = (mask & ((eps_low != cfg.eps_low) | (eps_high != cfg.eps_high))).sum()
    if cfg.redistribute:
        ratio = torch.exp((logp.detach().float() - old_logp.float()).clamp(-20, 20))
        adv = redistribute_advantages(advantages, h_hat, ratio, eps_low, eps_high, cfg.beta)
        base = advantages if advantages.dim() == adv.dim() else advantages.unsqueeze(-1).expand_as(adv)
        metrics["adv_redistributed"] = (mask & (adv != base)).sum()
    weights = None
    if cfg.rollout_correction is not None:
        if behaviour_logp is None:
            raise ValueError(f"rollout_correction={cfg.rollout_correction!r} needs behaviour_logp (the engine's log-probs at T_b)")
        weights, ratio, hit = rollout_correction_weights(cfg.rollout_correction, old_logp, behaviour_logp, mask, cfg.tis_cap)
        metrics.update(rc_weight=weights.sum(), rc_ratio=ratio.sum(), rc_hit=hit.sum())
    token_loss, info = weighted_token_losses(logp, old_logp, adv, mask, eps_low, eps_high, cfg.clip_ratio_c, weights)
    loss = aggregate_loss(token_loss, mask, cfg.agg, normalizer)
    metrics.update(
        tokens=mask.sum(),
        clip_low=info["clip_low"].sum(),
        clip_high=info["clip_high"].sum(),
        clip_dual=info["clip_dual"].sum(),
    )
    return loss, {k: v.detach().to(torch.float64) for k, v in metrics.items()}


class PolicyLoss:
    """The loss as the Megatron layer sees it, so that a new algorithm touches `algorithms/` only:

    - `inputs`: the per-sequence / per-token tensors it reads from the batch, by name;
    - `normalizer(mask)`: what one micro-batch counts (valid tokens for token-mean, non-empty
      sequences otherwise); the loss returns the local *sum* and Megatron divides the gradient by
      the count summed over micro-batches and data-parallel ranks (a global mean whatever the split);
    - `__call__` → (loss sum, count, metric sums), `SUMS` their names, `metrics(totals)` the
      reduced numbers a step reports.
    """

    SUMS = ("loss_sum", "count", "tokens", "entropy_sum", "drift_sum", "clip_low", "clip_high", "clip_dual",
            "adv_redistributed", "bounds_adapted", "rc_weight", "rc_ratio", "rc_hit")

    def __init__(self, cfg: AlgorithmConfig):
        self.cfg = cfg

    @property
    def inputs(self) -> tuple:
        names = ("advantages", "old_logp")
        if self.cfg.uses_entropy and self.cfg.loss_stats == "step_old":
            names += ("h_hat",)  # h̃ of the old pass's entropies under the step's statistics
        if self.cfg.rollout_correction is not None:
            names += ("behaviour_logp",)
        return names

    def check(self, available) -> None:
        missing = [n for n in self.inputs if n not in available]
        if missing:
            raise ValueError(f"algorithm {self.cfg.name!r} (loss_stats={self.cfg.loss_stats!r}, rollout_correction="
                             f"{self.cfg.rollout_correction!r}) needs {missing} in the batch")

    def normalizer(self, mask: torch.Tensor) -> torch.Tensor:
        return mask.sum() if self.cfg.agg == "token-mean" else (mask.sum(-1) > 0).sum()

    def __call__(self, logp: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, inputs: dict):
        cfg = self.cfg
        h = inputs.get("h_hat")
        if cfg.uses_entropy and cfg.loss_stats == "micro_batch_current":
            h = loss_entropy_scale(cfg, mask, current_entropy=entropy) if bool(mask.any()) else torch.zeros_like(entropy)
        old = inputs["old_logp"]
        loss_sum, sums = compute_policy_loss(cfg, logp, old, inputs["advantages"], mask, h_hat=h, normalizer=1.0,
                                             behaviour_logp=inputs.get("behaviour_logp"))
        count = self.normalizer(mask)
        sums.update(loss_sum=loss_sum.detach().double(), count=count.double(),
                    entropy_sum=(entropy.detach() * mask).sum().double(),
                    drift_sum=((logp.detach() - old).abs() * mask).sum().double())
        return loss_sum, count, sums

    def metrics(self, totals: dict) -> dict:
        """The step's numbers from the sums over micro-batches and ranks (a missing sum is 0)."""
        totals = {k: float(totals.get(k, 0.0)) for k in self.SUMS}
        tokens = max(totals["tokens"], 1.0)
        out = {
            "loss": totals["loss_sum"] / max(totals["count"], 1.0),
            "entropy": totals["entropy_sum"] / tokens,
            "clip_frac_low": totals["clip_low"] / tokens,
            "clip_frac_high": totals["clip_high"] / tokens,
            "clip_frac_dual": totals["clip_dual"] / tokens,
            "hapo_adv_changed_frac": totals["adv_redistributed"] / tokens,
            "hapo_bounds_changed_frac": totals["bounds_adapted"] / tokens,
            "policy_drift": totals["drift_sum"] / tokens,
            "tokens": totals["tokens"],
        }
        if self.cfg.rollout_correction is not None:
            # the weight the loss applied, the ratio at the correction's level (token or sequence), and the
            # share of tokens it truncated (tis, seq-tis) or masked (icepop, seq-mis, geo-rs)
            out.update(rollout_correction_weight_mean=totals["rc_weight"] / tokens,
                       rollout_correction_ratio_mean=totals["rc_ratio"] / tokens,
                       rollout_correction_hit_frac=totals["rc_hit"] / tokens)
        return out


def logprob_mismatch_sums(engine_logp: torch.Tensor, trainer_logp: torch.Tensor, mask) -> torch.Tensor:
    """[Σ|Δ log p|, Σ(exp(−Δ) − 1), token count, max |Δ log p|] over valid tokens (float64, on the
    host): sums that add up over micro-batches and data-parallel ranks."""
    mask = as_mask("mask", mask, trainer_logp)
    d = (engine_logp.double() - trainer_logp.double())[mask]
    if d.numel() == 0:
        return torch.zeros(4, dtype=torch.float64)
    count = torch.tensor(float(d.numel()), dtype=torch.float64, device=d.device)
    return torch.stack([d.abs().sum(), (torch.exp(-d) - 1).sum(), count, d.abs().max()]).cpu()


def logprob_mismatch(engine_logp: torch.Tensor, trainer_logp: torch.Tensor, mask) -> dict:
    """Rollout-vs-trainer agreement on the sampled tokens at the same temperature: the number that
    catches a broken weight sync or numerics. Returns mean and max |Δ log p| and the mean of
    exp(Δ) − 1 (a biased importance ratio), over valid tokens."""
    total, bias, count, largest = logprob_mismatch_sums(engine_logp, trainer_logp, mask).tolist()
    count = max(count, 1.0)
    return {"logp_mismatch_mean": total / count, "logp_mismatch_max": largest, "ratio_bias": bias / count}
