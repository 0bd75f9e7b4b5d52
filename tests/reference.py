"""Float64 references written straight from docs/HAPO.md, one token at a time in plain Python.

Deliberately unvectorised and independent of megatron_hapo's code paths.
"""
from __future__ import annotations

import math
import statistics


def flat_valid(entropy, mask):
    return [float(h) for row_h, row_m in zip(entropy, mask) for h, m in zip(row_h, row_m) if m]


def entropy_stats(values, pivot=0.8, eps=1e-8):
    ell = sorted(math.log(max(h, eps)) for h in values)
    n = len(ell)
    q = ell[round(pivot * (n - 1))]
    sigma = math.sqrt(max(sum((x - q) ** 2 for x in ell) / n, eps))
    z = [(x - q) / sigma for x in ell]
    z_pos = max(max([v for v in z if v > 0], default=eps), eps)
    z_neg = min(min([v for v in z if v < 0], default=-eps), -eps)
    return q, sigma, z_pos, z_neg


def h_tilde(h, stats, sign_mode="signed", eps=1e-8):
    q, sigma, z_pos, z_neg = stats
    z = (math.log(max(h, eps)) - q) / sigma
    if z > 0:
        v = z / z_pos
    else:
        v = z / abs(z_neg) if sign_mode == "signed" else z / z_neg
    return min(max(v, -1.0), 1.0)


def token_group_advantages(rewards, lengths, groups, kappa=5.0, eps=1e-6):
    out = [0.0] * len(rewards)
    for g in dict.fromkeys(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        total = sum(lengths[i] for i in idx)
        if total == 0 or len({rewards[i] for i in idx}) == 1:
            continue
        mu = sum(lengths[i] * rewards[i] for i in idx) / total
        sd = math.sqrt(sum(lengths[i] * (rewards[i] - mu) ** 2 for i in idx) / total)
        adv = {i: (rewards[i] - mu) / (sd + eps) for i in idx}
        if kappa is not None and any(abs(adv[i]) >= kappa for i in idx if lengths[i] > 0):
            adv = dict(zip(idx, grpo_advantages([rewards[i] for i in idx], [0] * len(idx), eps)))
        for i in idx:
            out[i] = adv[i]
    return out


def grpo_advantages(rewards, groups, eps=1e-6):
    out = [0.0] * len(rewards)
    for g in dict.fromkeys(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        vals = [rewards[i] for i in idx]
        if len(vals) == 1:
            mean, sd = 0.0, 1.0
        else:
            mean, sd = statistics.fmean(vals), statistics.stdev(vals)
        for i in idx:
            out[i] = 0.0 if len(vals) > 1 and len(set(vals)) == 1 else (rewards[i] - mean) / (sd + eps)
    return out


def clip_bounds(h, eps_low=0.2, eps_high=0.28, alpha=1.0):
    low = eps_low * (1 - alpha * h) if h <= 0 else eps_low
    high = eps_high * (1 + alpha * h) if h > 0 else eps_high
    return low, high


def redistribute(a, h, r, low, high, beta=1.0):
    inside = (1 - low / 2) < r < (1 + high / 2)
    if (h > 0 and not inside) or (h <= 0 and inside):
        return a * (1 + beta * h)
    return a


def token_loss(logp, old, a, low, high, c=10.0):
    r = math.exp(logp - old)
    loss = max(-a * r, -a * min(max(r, 1 - low), 1 + high))
    if c is not None and a < 0:
        loss = min(loss, -a * c)
    return loss


def policy_loss(logp, old, adv, mask, low, high, c=10.0, agg="token-mean"):
    """adv, low, high: per token nested lists (broadcast already done by the caller)."""
    rows = []
    for i in range(len(mask)):
        rows.append([token_loss(logp[i][t], old[i][t], adv[i][t], low[i][t], high[i][t], c)
                     for t in range(len(mask[i])) if mask[i][t]])
    if agg == "token-mean":
        n = sum(len(r) for r in rows)
        return sum(sum(r) for r in rows) / max(n, 1)
    rows = [r for r in rows if r]
    if agg == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows) / max(len(rows), 1)
    return sum(sum(r) for r in rows) / max(len(rows), 1)
