"""HAPO's shared primitive: entropy statistics and the normalized entropy h̃ in [-1, 1].

See docs (HAPO.md §0). The statistics (q, σ, z⁺, z⁻) travel from the trainer, which computes
them over the old-policy entropies of a whole step, to the rollout engine and the loss.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ._checks import as_mask, as_tensor, finite, one_of

SIGN_MODES = ("signed", "released")


@dataclasses.dataclass(frozen=True)
class EntropyStats:
    """Statistics of log-entropy over a set of valid tokens.

    q: the pivot quantile of log(H); sigma: RMS of log(H) about q; z_pos: the largest positive
    z-score (≥ eps); z_neg: the most negative z-score (≤ -eps).
    """

    q: float
    sigma: float
    z_pos: float
    z_neg: float

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = float(getattr(self, f.name))
            if not math.isfinite(v):
                raise ValueError(f"EntropyStats.{f.name}: non-finite value {v}")
            object.__setattr__(self, f.name, v)
        if self.sigma <= 0:
            raise ValueError(f"EntropyStats.sigma: must be positive, got {self.sigma}")
        if self.z_pos <= 0:
            raise ValueError(f"EntropyStats.z_pos: must be positive, got {self.z_pos}")
        if self.z_neg >= 0:
            raise ValueError(f"EntropyStats.z_neg: must be negative, got {self.z_neg}")

    def metrics(self) -> dict:
        """As a step reports them: entropy_q, entropy_sigma, entropy_z_pos, entropy_z_neg."""
        return {f"entropy_{k}": v for k, v in self.to_dict().items()}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EntropyStats":
        missing = {"q", "sigma", "z_pos", "z_neg"} - set(d)
        if missing:
            raise ValueError(f"EntropyStats: missing fields {sorted(missing)}")
        return cls(q=d["q"], sigma=d["sigma"], z_pos=d["z_pos"], z_neg=d["z_neg"])


def log_entropy(entropy: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """ℓ = log(max(H, eps)), at least in float32."""
    x = entropy.to(torch.promote_types(entropy.dtype, torch.float32))
    return torch.log(torch.clamp(x, min=eps))


def pivot_index(n: int, pivot: float) -> int:
    """Nearest-rank index of the pivot quantile in an ascending sort of n values."""
    return int(round(pivot * (n - 1)))


def stats_from_moments(q: float, sum_sq: float, n: int, z_max: float, z_min: float, eps: float = 1e-8) -> EntropyStats:
    """Builds EntropyStats from the pivot q, Σ(ℓ − q)² and the extreme values of (ℓ − q)/σ·σ.

    z_max / z_min are max(ℓ) − q and min(ℓ) − q; the distributed version reduces exactly these.
    """
    sigma = math.sqrt(max(sum_sq / n, eps))
    z_hi = z_max / sigma
    z_lo = z_min / sigma
    return EntropyStats(
        q=q,
        sigma=sigma,
        z_pos=max(z_hi, eps) if z_hi > 0 else eps,
        z_neg=min(z_lo, -eps) if z_lo < 0 else -eps,
    )


def check_entropy_args(entropy, mask, pivot: float):
    entropy = as_tensor("entropy", entropy)
    if not entropy.is_floating_point():
        raise TypeError(f"entropy: expected a floating-point tensor, got {entropy.dtype}")
    mask = as_mask("mask", mask, entropy)
    if not 0.0 <= pivot <= 1.0:
        raise ValueError(f"pivot: must lie in [0, 1], got {pivot}")
    finite("entropy", entropy, where=mask)
    return entropy, mask


def entropy_stats(entropy, mask, pivot: float = 0.8, eps: float = 1e-8) -> EntropyStats:
    """EntropyStats over the tokens selected by mask (HAPO.md §0)."""
    entropy, mask = check_entropy_args(entropy, mask, pivot)
    ell = log_entropy(entropy[mask], eps).to(torch.float64)
    n = ell.numel()
    if n == 0:
        raise ValueError("mask: selects no tokens; entropy statistics need at least one valid token")
    q = ell.sort().values[pivot_index(n, pivot)]
    d = ell - q
    return stats_from_moments(float(q), float((d * d).sum()), n, float(d.max()), float(d.min()), eps)


def normalized_entropy(entropy, stats: EntropyStats, sign_mode: str = "signed", eps: float = 1e-8) -> torch.Tensor:
    """h̃ in [-1, 1]: +1 for the most uncertain tokens of the reference set.

    "signed" (the paper's intent): z/z⁺ above the pivot, z/|z⁻| below it, so confident tokens go
    negative. "released" (the authors' code): z/z⁻ below the pivot, which mirrors them to [0, 1].
    """
    one_of("sign_mode", sign_mode, SIGN_MODES)
    if not isinstance(stats, EntropyStats):
        raise TypeError(f"stats: expected EntropyStats, got {type(stats).__name__}")
    entropy = as_tensor("entropy", entropy)
    if not entropy.is_floating_point():
        raise TypeError(f"entropy: expected a floating-point tensor, got {entropy.dtype}")
    low_scale = -stats.z_neg if sign_mode == "signed" else stats.z_neg
    return h_tilde(log_entropy(entropy, eps), stats.q, stats.sigma, stats.z_pos, low_scale).to(entropy.dtype)


def h_tilde(ell, q, sigma, z_pos, low_scale):
    """The formula of `normalized_entropy` from ℓ = log H, with its statistics as numbers or as
    tensors broadcast against ℓ (the rollout's fused kernel passes one set per row)."""
    z = (ell - q) / sigma
    h = torch.where(z > 0, z / z_pos, z / low_scale)
    # Padding cells may hold NaN entropy; keep them NaN-free without touching real values.
    return torch.nan_to_num(h, nan=0.0).clamp(-1.0, 1.0)


def adaptive_temperature(
    entropy,
    stats: EntropyStats | None,
    base_temperature: float = 1.0,
    tau: float = 0.05,
    sign_mode: str = "signed",
) -> torch.Tensor:
    """HAPO A: T = T_base · (1 + τ·h̃(H)); stats=None (first step) gives T_base everywhere."""
    if not base_temperature > 0:
        raise ValueError(f"base_temperature: must be positive, got {base_temperature}")
    if not 0 <= tau < 1:
        raise ValueError(f"tau: must lie in [0, 1) so that temperatures stay positive, got {tau}")
    entropy = as_tensor("entropy", entropy)
    if stats is None:
        one_of("sign_mode", sign_mode, SIGN_MODES)
        dtype = entropy.dtype if entropy.is_floating_point() else torch.float32
        return torch.full(entropy.shape, float(base_temperature), dtype=dtype, device=entropy.device)
    h = normalized_entropy(entropy, stats, sign_mode=sign_mode)
    return base_temperature * (1.0 + tau * h)
