"""HAPO C and D, and the dual-clip PPO policy loss with global normalizers (HAPO.md §C, §D).

Only `policy_loss` carries a gradient (to `logp`); bounds, ratios used for redistribution and
advantages are treated as constants.
"""
from __future__ import annotations

import math

import torch

from ._checks import as_mask, as_tensor, one_of, same_shape

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
# exp() of a log-ratio beyond this overflows float32 and its backward would yield 0·inf = NaN.
LOG_RATIO_CLAMP = 20.0


def adaptive_clip_bounds(h_hat, eps_low: float = 0.2, eps_high: float = 0.28, alpha: float = 1.0):
    """HAPO D: confident tokens (h̃ ≤ 0) get a wider left bound, uncertain ones (h̃ > 0) a wider right one.

    ε_L(t) = ε_L·(1 − α·h̃) where h̃ ≤ 0, else ε_L;  ε_H(t) = ε_H·(1 + α·h̃) where h̃ > 0, else ε_H.
    """
    h = as_tensor("h_hat", h_hat)
    if not h.is_floating_point():
        raise TypeError(f"h_hat: expected a floating-point tensor, got {h.dtype}")
    if not 0 <= eps_low < 1:
        raise ValueError(f"eps_low: must lie in [0, 1), got {eps_low}")
    if not eps_high >= 0:
        raise ValueError(f"eps_high: must be non-negative, got {eps_high}")
    if not alpha >= 0:
        raise ValueError(f"alpha: must be non-negative, got {alpha}")
    h = h.detach()
    low = torch.where(h <= 0, eps_low * (1.0 - alpha * h), torch.full_like(h, eps_low))
    high = torch.where(h > 0, eps_high * (1.0 + alpha * h), torch.full_like(h, eps_high))
    return low, high


def _per_token(name: str, value, like: torch.Tensor) -> torch.Tensor:
    """A float, a per-sequence [B] tensor or a per-token [B, T] tensor, as [B, T]."""
    if isinstance(value, torch.Tensor):
        t = value.to(device=like.device)
    else:  # a float or a list: take the token tensor's precision
        t = as_tensor(name, value, dtype=like.dtype if like.is_floating_point() else None).to(like.device)
    if t.dim() == like.dim() - 1 and tuple(t.shape) == tuple(like.shape[:-1]):
        t = t.unsqueeze(-1)
    elif t.dim() != 0 and tuple(t.shape) != tuple(like.shape):
        raise ValueError(
            f"{name}: shape {tuple(t.shape)} is neither per sequence {tuple(like.shape[:-1])} "
            f"nor per token {tuple(like.shape)}"
        )
    return t.expand(like.shape)


def redistribute_advantages(advantages, h_hat, ratio, eps_low_t, eps_high_t, beta: float = 1.0) -> torch.Tensor:
    """HAPO C: Â = A·(1 + β·h̃) for uncertain tokens whose ratio left the inner band and for
    confident tokens whose ratio stayed inside it; Â = A elsewhere. The band is
    (1 − ε_L(t)/2, 1 + ε_H(t)/2), strict. `advantages` may be per token [B, T] or per sequence [B].
    """
    h = as_tensor("h_hat", h_hat).detach()
    ratio = as_tensor("ratio", ratio).detach()
    same_shape(h_hat=h, ratio=ratio)
    if not beta >= 0:
        raise ValueError(f"beta: must be non-negative, got {beta}")
    adv = _per_token("advantages", advantages, h).detach()
    low = _per_token("eps_low_t", eps_low_t, h)
    high = _per_token("eps_high_t", eps_high_t, h)
    inside = (ratio > 1.0 - low / 2) & (ratio < 1.0 + high / 2)
    scaled = ((h > 0) & ~inside) | ((h <= 0) & inside)
    return torch.where(scaled, adv * (1.0 + beta * h), adv)


def ppo_token_losses(logp, old_logp, advantages, mask, eps_low, eps_high, clip_ratio_c: float | None = 10.0):
    """Per-token dual-clip PPO loss, zero on masked cells, and the masks of which clip was active.

    Returns (loss [B, T], info) with info = {"ratio", "clip_low", "clip_high", "clip_dual"}.
    """
    logp = as_tensor("logp", logp)
    if not logp.is_floating_point():
        raise TypeError(f"logp: expected a floating-point tensor, got {logp.dtype}")
    logp = logp.to(torch.promote_types(logp.dtype, torch.float32))  # bf16 log-probs: ratio in fp32
    old_logp = as_tensor("old_logp", old_logp).to(logp.device)
    same_shape(logp=logp, old_logp=old_logp)
    mask = as_mask("mask", mask, logp)
    adv = _per_token("advantages", advantages, logp).detach()
    low = _per_token("eps_low", eps_low, logp).detach()
    high = _per_token("eps_high", eps_high, logp).detach()
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c: the dual clip needs c > 1 (or None to disable), got {clip_ratio_c}")

    # Padding may hold anything (−inf, NaN): select before arithmetic so it cannot leak.
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    log_ratio = torch.where(mask, logp - old_logp.detach(), zero).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    adv = torch.where(mask, adv, zero.to(adv.dtype))
    ratio = torch.exp(log_ratio)
    lower, upper = 1.0 - low, 1.0 + high
    unclipped = -adv * ratio
    clipped = -adv * torch.minimum(torch.maximum(ratio, lower), upper)
    loss = torch.maximum(unclipped, clipped)
    clip_dual = torch.zeros_like(mask)
    if clip_ratio_c is not None:
        bound = -adv * clip_ratio_c
        clip_dual = mask & (adv < 0) & (loss > bound)
        loss = torch.where(adv < 0, torch.minimum(loss, bound), loss)
    loss = torch.where(mask, loss, zero)
    r = ratio.detach()
    info = {
        "ratio": r,
        "clip_low": mask & (adv < 0) & (r < lower),
        "clip_high": mask & (adv > 0) & (r > upper),
        "clip_dual": clip_dual,
    }
    return loss, info


def aggregate_loss(token_loss: torch.Tensor, mask, agg: str = "token-mean", normalizer=None) -> torch.Tensor:
    """Reduces a per-token loss [B, T] to a scalar.

    token-mean: Σ M·ℓ / Σ M. seq-mean-token-mean: mean over sequences of their token mean.
    seq-mean-token-sum: mean over sequences of their token sum. Sequences without a valid token
    do not count. `normalizer` replaces the local denominator (Σ M for token-mean, the number of
    sequences otherwise) with a global one, so that summing the results of every micro-batch and
    rank gives the loss of the whole mini-batch whatever the split.
    """
    one_of("agg", agg, AGGREGATIONS)
    mask = as_mask("mask", mask, token_loss)
    m = mask.to(token_loss.dtype)
    if agg == "token-mean":
        total = (token_loss * m).sum()
        count = m.sum()
    else:
        per_seq = (token_loss * m).sum(-1)
        tokens = m.sum(-1)
        if agg == "seq-mean-token-mean":
            per_seq = per_seq / tokens.clamp(min=1)
        total = per_seq.sum()
        count = (tokens > 0).to(token_loss.dtype).sum()
    if normalizer is not None:
        denom = as_tensor("normalizer", normalizer).to(device=token_loss.device, dtype=token_loss.dtype)
        if denom.numel() != 1 or not bool(denom > 0):
            raise ValueError(f"normalizer: must be one positive number, got {denom}")
        return total / denom.reshape(())
    return total / count.clamp(min=1)


def policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    eps_low=0.2,
    eps_high=0.28,
    clip_ratio_c: float | None = 10.0,
    agg: str = "token-mean",
    normalizer=None,
    weights=None,
) -> torch.Tensor:
    """Dual-clip PPO loss on (redistributed) advantages, with per-token or scalar bounds.

    ℓ = max(−Â·r, −Â·clip(r, 1 − ε_L, 1 + ε_H)); where Â < 0, ℓ = min(ℓ, −Â·c). `weights`
    (per token, no gradient) multiplies each token's loss, e.g. truncated importance weights.
    """
    one_of("agg", agg, AGGREGATIONS)
    loss, _ = weighted_token_losses(logp, old_logp, advantages, mask, eps_low, eps_high, clip_ratio_c, weights)
    return aggregate_loss(loss, mask, agg, normalizer)


def weighted_token_losses(logp, old_logp, advantages, mask, eps_low, eps_high, clip_ratio_c=10.0, weights=None):
    """`ppo_token_losses` with each token's loss multiplied by `weights` (no gradient; None: 1), the
    one place where truncated importance weights enter the loss."""
    loss, info = ppo_token_losses(logp, old_logp, advantages, mask, eps_low, eps_high, clip_ratio_c)
    if weights is not None:
        loss = loss * _per_token("weights", weights, loss).detach()
    return loss, info


def truncated_is_weights(old_logp, behaviour_logp, mask, cap: float = 2.0) -> torch.Tensor:
    """TIS: w = min(π_old(y; T=1) / π_behaviour(y; T_b), cap), 0 on masked cells, no gradient."""
    return rollout_correction_weights("tis", old_logp, behaviour_logp, mask, cap)[0]


ROLLOUT_CORRECTIONS = (None, "tis", "icepop", "seq-tis", "seq-mis", "geo-rs")
_LOG_RATIO_METRIC_CLAMP = 20.0  # a sequence ratio can overflow; its metric is taken at e^±20 at most


def rollout_correction_weights(kind: str, old_logp, behaviour_logp, mask, c: float = 2.0):
    """Per-token loss weights (no gradient) for responses sampled from the engine's policy π_b (at the
    recorded temperature) while the loss takes π_old as the behaviour: with r = π_old(y)/π_b(y) per
    token, R = Π r over the response's valid tokens and G = R^(1/n) (n valid tokens),

        tis      w = min(r, c)                          hit: r ≥ c (truncated)
        icepop   w = r if 1/c ≤ r ≤ c else 0            hit: outside (masked)
        seq-tis  w = min(R, c) on every token           hit: R ≥ c (truncated)
        seq-mis  w = R if R ≤ c else 0 (masked IS)      hit: R > c (masked)
        geo-rs   w = 1 if 1/c ≤ G ≤ c else 0 (rejection) hit: outside (masked)

    verl's rollout-correction names: token / sequence IS, IcePop's two-sided token mask, masked IS,
    geometric-mean rejection sampling. Rows are whole responses (the loss's per-sequence layout).
    Returns (weights, ratio, hit): the ratio at the kind's level per token (for the metrics, clamped
    at e^±20), and whether the token was truncated or masked; all 0 / False on masked cells."""
    old_logp = as_tensor("old_logp", old_logp).detach()
    behaviour_logp = as_tensor("behaviour_logp", behaviour_logp).detach().to(old_logp.device)
    same_shape(old_logp=old_logp, behaviour_logp=behaviour_logp)
    mask = as_mask("mask", mask, old_logp)
    if kind not in ROLLOUT_CORRECTIONS or kind is None:
        raise ValueError(f"rollout correction: unknown kind {kind!r}; expected one of {ROLLOUT_CORRECTIONS[1:]}")
    if not c > 1:
        raise ValueError(f"rollout correction threshold c: must be > 1, got {c}")
    log_c = math.log(c)
    log_r = torch.where(mask, old_logp.double() - behaviour_logp.double(), torch.zeros_like(old_logp, dtype=torch.float64))
    if kind in ("tis", "icepop"):
        level = log_r
    else:
        total = log_r.sum(-1, keepdim=True)  # log R per response
        level = total / mask.sum(-1, keepdim=True).clamp(min=1) if kind == "geo-rs" else total
        level = level.expand_as(log_r)
    if kind in ("tis", "seq-tis"):
        weights, hit = torch.exp(level.clamp(max=log_c)), level >= log_c
    elif kind == "seq-mis":
        hit = level > log_c
        weights = torch.where(hit, torch.zeros_like(level), torch.exp(level.clamp(max=log_c)))
    else:  # icepop, geo-rs: a band [1/c, c]
        hit = level.abs() > log_c
        inside = torch.exp(level.clamp(-log_c, log_c)) if kind == "icepop" else torch.ones_like(level)
        weights = torch.where(hit, torch.zeros_like(level), inside)
    zero = torch.zeros_like(level)
    ratio = torch.where(mask, torch.exp(level.clamp(-_LOG_RATIO_METRIC_CLAMP, _LOG_RATIO_METRIC_CLAMP)), zero)
    return torch.where(mask, weights, zero).to(old_logp.dtype), ratio, hit & mask
