import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from megatron_hapo.algorithms import (
    AGGREGATIONS,
    adaptive_clip_bounds,
    policy_loss,
    ppo_token_losses,
    redistribute_advantages,
    truncated_is_weights,
)

from . import reference as ref

h_values = st.floats(-1.0, 1.0)


@st.composite
def loss_batch(draw):
    b, t = draw(st.integers(1, 4)), draw(st.integers(1, 7))
    n = b * t
    logp = draw(st.lists(st.floats(-6.0, 0.0), min_size=n, max_size=n))
    delta = draw(st.lists(st.floats(-1.5, 1.5), min_size=n, max_size=n))
    h = draw(st.lists(h_values, min_size=n, max_size=n))
    adv = draw(st.lists(st.floats(-3.0, 3.0), min_size=b, max_size=b))
    mask = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    mask[0] = True
    t64 = lambda x: torch.tensor(x, dtype=torch.float64).view(b, t)  # noqa: E731
    old = t64(logp)
    return old + t64(delta), old, torch.tensor(adv, dtype=torch.float64), t64(h), torch.tensor(mask).view(b, t)


def test_clip_bounds_hand_worked():
    low, high = adaptive_clip_bounds(torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]), 0.2, 0.28, 1.0)
    assert low.tolist() == pytest.approx([0.4, 0.3, 0.2, 0.2, 0.2])
    assert high.tolist() == pytest.approx([0.28, 0.28, 0.28, 0.42, 0.56])


@given(st.lists(h_values, min_size=1, max_size=20), st.floats(0, 0.5), st.floats(0, 0.5), st.floats(0, 2))
def test_clip_bounds_match_reference(h, el, eh, alpha):
    low, high = adaptive_clip_bounds(torch.tensor(h, dtype=torch.float64), el, eh, alpha)
    want = [ref.clip_bounds(x, el, eh, alpha) for x in h]
    assert low.tolist() == pytest.approx([w[0] for w in want])
    assert high.tolist() == pytest.approx([w[1] for w in want])
    assert bool((low >= el - 1e-12).all() and (high >= eh - 1e-12).all())


def test_redistribution_hand_worked():
    adv = torch.tensor([2.0, 2.0, 2.0, 2.0, -1.0])
    h = torch.tensor([0.5, 0.5, -0.5, -0.5, 0.0])
    ratio = torch.tensor([1.0, 1.3, 1.0, 1.3, 1.0])
    # band: (1 - 0.2/2, 1 + 0.28/2) = (0.9, 1.14)
    out = redistribute_advantages(adv, h, ratio, 0.2, 0.28, beta=1.0)
    # uncertain & inside: A; uncertain & outside: A·1.5; confident & inside: A·0.5; outside: A; h=0 inside: A·1
    assert out.tolist() == pytest.approx([2.0, 3.0, 1.0, 2.0, -1.0])
    # the band is strict
    edge = redistribute_advantages(torch.ones(2), torch.tensor([0.5, 0.5]), torch.tensor([0.9, 1.14]), 0.2, 0.28)
    assert edge.tolist() == pytest.approx([1.5, 1.5])


@given(loss_batch(), st.floats(0, 1))
def test_redistribution_matches_reference_and_keeps_sign(batch, beta):
    logp, old, adv, h, _ = batch
    ratio = torch.exp(logp - old)
    low, high = adaptive_clip_bounds(h)
    out = redistribute_advantages(adv, h, ratio, low, high, beta)
    b, t = h.shape
    for i in range(b):
        for j in range(t):
            want = ref.redistribute(adv[i].item(), h[i, j].item(), ratio[i, j].item(), low[i, j].item(), high[i, j].item(), beta)
            assert out[i, j].item() == pytest.approx(want, abs=1e-12)
            assert out[i, j].item() * adv[i].item() >= 0, "β ≤ 1 never flips the sign"


@given(loss_batch(), st.sampled_from(AGGREGATIONS), st.sampled_from([10.0, 3.0, None]), st.booleans())
def test_policy_loss_matches_reference(batch, agg, c, per_token_bounds):
    logp, old, adv, h, mask = batch
    if per_token_bounds:
        low, high = adaptive_clip_bounds(h)
    else:
        low, high = torch.full_like(h, 0.2), torch.full_like(h, 0.28)
    a_tok = redistribute_advantages(adv, h, torch.exp(logp - old), low, high)
    got = policy_loss(logp, old, a_tok, mask, low if per_token_bounds else 0.2, high if per_token_bounds else 0.28, c, agg)
    want = ref.policy_loss(logp.tolist(), old.tolist(), a_tok.tolist(), mask.tolist(), low.tolist(), high.tolist(), c, agg)
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_dual_clip_bounds_negative_advantage_loss():
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.log(torch.tensor([[50.0, 2.0, 0.5]], dtype=torch.float64))
    loss, info = ppo_token_losses(logp, old, torch.tensor([-2.0]), torch.ones(1, 3), 0.2, 0.28, clip_ratio_c=10.0)
    assert loss.tolist()[0] == pytest.approx([20.0, 4.0, 1.6])  # 2·min(50, 10); 2·2; 2·max(0.5, 0.8)
    assert info["clip_dual"].tolist() == [[True, False, False]]
    assert info["clip_low"].tolist() == [[False, False, True]]
    free, _ = ppo_token_losses(logp, old, torch.tensor([-2.0]), torch.ones(1, 3), 0.2, 0.28, clip_ratio_c=None)
    assert free[0, 0].item() == pytest.approx(100.0)
    # the dual-clipped token contributes no gradient
    lp = logp.clone().requires_grad_()
    policy_loss(lp, old, torch.tensor([-2.0]), torch.ones(1, 3)).backward()
    assert lp.grad[0, 0].item() == 0.0 and lp.grad[0, 1].item() != 0.0


@given(loss_batch(), st.sampled_from(AGGREGATIONS), st.data())
def test_padding_never_changes_loss_or_gradient(batch, agg, data):
    logp, old, adv, h, mask = batch
    low, high = adaptive_clip_bounds(h)
    junk = data.draw(st.sampled_from([float("nan"), float("-inf"), float("inf"), 1e6]))
    lp1 = logp.clone().requires_grad_()
    l1 = policy_loss(lp1, old, adv, mask, low, high, agg=agg)
    l1.backward()
    lp2 = torch.where(mask, logp, torch.full_like(logp, junk)).requires_grad_()
    old2 = torch.where(mask, old, torch.full_like(old, junk))
    l2 = policy_loss(lp2, old2, adv, mask, low, high, agg=agg)
    l2.backward()
    assert l1.item() == pytest.approx(l2.item(), rel=1e-12, abs=1e-15)
    assert torch.equal(lp1.grad, lp2.grad)
    assert bool((lp2.grad[~mask] == 0).all())


def test_gradients_against_finite_differences():
    torch.manual_seed(0)
    b, t = 3, 5
    old = -torch.rand(b, t, dtype=torch.float64) * 3
    # ratios spread over every regime but away from the kinks at 1 − ε_L, 1 + ε_H and c
    ratios = torch.tensor([0.5, 0.95, 1.05, 1.6, 12.0]).repeat(b, 1).to(torch.float64)
    logp = (old + ratios.log()).requires_grad_()
    adv = torch.tensor([1.3, -0.7, -2.0], dtype=torch.float64)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[2, 4] = False
    low = torch.full((b, t), 0.3, dtype=torch.float64)
    high = torch.full((b, t), 0.4, dtype=torch.float64)
    for agg in AGGREGATIONS:
        assert torch.autograd.gradcheck(lambda x: policy_loss(x, old, adv, mask, low, high, 10.0, agg), (logp,))
    # and the analytic value on the unclipped regime: d/dlogp (−A·r)/N = −A·r/N
    lp = logp.detach().clone().requires_grad_()
    policy_loss(lp, old, adv, mask, low, high, None, "token-mean").backward()
    assert lp.grad[0, 1].item() == pytest.approx(-1.3 * 0.95 / mask.sum().item())


@given(loss_batch(), st.sampled_from(AGGREGATIONS), st.integers(1, 4))
def test_global_normalizer_makes_micro_batching_invisible(batch, agg, n_micro):
    logp, old, adv, h, mask = batch
    low, high = adaptive_clip_bounds(h)
    full = policy_loss(logp, old, adv, mask, low, high, agg=agg)
    if agg == "token-mean":
        norm = mask.sum()
    else:
        norm = (mask.sum(-1) > 0).sum()
    parts = torch.arange(logp.shape[0]).tensor_split(n_micro)
    total = sum(
        policy_loss(logp[p], old[p], adv[p], mask[p], low[p], high[p], agg=agg, normalizer=norm) for p in parts if len(p)
    )
    assert total.item() == pytest.approx(full.item(), rel=1e-12, abs=1e-15)


def test_positive_advantage_gradient_raises_logp():
    logp = torch.zeros(1, 4, requires_grad=True)
    policy_loss(logp, torch.zeros(1, 4), torch.tensor([1.0]), torch.ones(1, 4)).backward()
    assert bool((logp.grad < 0).all()), "gradient descent must increase log-probs of positive-advantage tokens"


def test_bf16_logp_computes_in_fp32():
    logp = torch.log(torch.tensor([[0.3, 0.2]])).to(torch.bfloat16).requires_grad_()
    loss = policy_loss(logp, logp.detach().float(), torch.tensor([1.0]), torch.ones(1, 2))
    assert loss.dtype == torch.float32
    loss.backward()
    assert logp.grad.dtype == torch.bfloat16


def test_truncated_is_weights():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    beh = torch.log(torch.tensor([[0.5, 0.1, 0.9]]))
    w = truncated_is_weights(old, beh, torch.tensor([[1, 1, 0]]), cap=2.0)
    assert w.tolist()[0] == pytest.approx([1.0, 2.0, 0.0])
    # weights scale the per-token loss and carry no gradient
    lp = old.clone().requires_grad_()
    weighted = policy_loss(lp, old, torch.tensor([1.0]), torch.ones(1, 3), weights=torch.tensor([[1.0, 2.0, 0.0]]))
    assert weighted.item() == pytest.approx(-(1 + 2 + 0) / 3)


def _reference_correction(kind, old, beh, mask, c):
    """Loop over responses and tokens in float64, written from the definitions (docs/HAPO.md)."""
    import math

    w = torch.zeros(old.shape, dtype=torch.float64)
    hit = torch.zeros(old.shape, dtype=torch.bool)
    for i in range(old.shape[0]):
        idx = [t for t in range(old.shape[1]) if mask[i, t]]
        logs = [float(old[i, t]) - float(beh[i, t]) for t in idx]
        big_r = math.exp(sum(logs)) if logs else 1.0
        geo = math.exp(sum(logs) / len(logs)) if logs else 1.0
        for t, lr in zip(idx, logs):
            r = math.exp(lr)
            if kind == "tis":
                w[i, t], hit[i, t] = min(r, c), r >= c
            elif kind == "icepop":
                inside = 1 / c <= r <= c
                w[i, t], hit[i, t] = (r if inside else 0.0), not inside
            elif kind == "seq-tis":
                w[i, t], hit[i, t] = min(big_r, c), big_r >= c
            elif kind == "seq-mis":
                w[i, t], hit[i, t] = (big_r if big_r <= c else 0.0), big_r > c
            else:
                inside = 1 / c <= geo <= c
                w[i, t], hit[i, t] = float(inside), not inside
    return w, hit


@pytest.mark.parametrize("kind", ["tis", "icepop", "seq-tis", "seq-mis", "geo-rs"])
def test_rollout_corrections_match_a_float64_reference(kind):
    from megatron_hapo.algorithms import rollout_correction_weights

    g = torch.Generator().manual_seed(7)
    old = -torch.rand(6, 9, generator=g, dtype=torch.float64) * 3
    beh = old + torch.randn(6, 9, generator=g, dtype=torch.float64) * (0.05 if kind == "geo-rs" else 0.4)
    mask = torch.rand(6, 9, generator=g) > 0.25
    mask[5] = False  # an empty response: weight 0 everywhere
    c = 1.05 if kind == "geo-rs" else 2.0
    w, ratio, hit = rollout_correction_weights(kind, old, beh, mask, c)
    ref_w, ref_hit = _reference_correction(kind, old, beh, mask, c)
    assert torch.allclose(w, ref_w, rtol=1e-12, atol=1e-15) and torch.equal(hit, ref_hit)
    assert 0 < int(hit.sum()) < int(mask.sum())  # the data exercise both sides of the threshold
    assert not bool(ratio[~mask].any())
    # the weights scale each token's loss and carry no gradient: the gradient is the weighted one
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    lp = (old + 0.01 * torch.randn(6, 9, generator=g, dtype=torch.float64)).requires_grad_()
    policy_loss(lp, old, adv, mask, weights=w).backward()
    lp_ref = lp.detach().clone().requires_grad_()
    ratio_ref = torch.exp(lp_ref - old)
    a = adv[:, None].expand_as(old)
    tok = torch.maximum(-a * ratio_ref, -a * ratio_ref.clamp(0.8, 1.28))
    tok = torch.where(a < 0, torch.minimum(tok, -a * 10.0), tok)
    ((tok * ref_w)[mask].sum() / mask.sum()).backward()
    assert torch.allclose(lp.grad, lp_ref.grad, rtol=1e-10, atol=1e-14)


def test_rollout_correction_refusals():
    from megatron_hapo.algorithms import rollout_correction_weights

    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="unknown kind 'is'"):
        rollout_correction_weights("is", x, x, torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be > 1"):
        rollout_correction_weights("icepop", x, x, torch.ones(1, 2, dtype=torch.bool), c=1.0)
    # a sequence ratio far beyond float range: weights and metrics stay finite
    w, ratio, hit = rollout_correction_weights("seq-mis", torch.zeros(1, 4000), torch.full((1, 4000), -1.0),
                                               torch.ones(1, 4000, dtype=torch.bool))
    assert not bool(w.any()) and bool(hit.all()) and torch.isfinite(ratio).all()
