import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from megatron_hapo.algorithms import EntropyStats, adaptive_temperature, entropy_stats, normalized_entropy

from . import reference as ref
from .strategies import token_batch


def stats_tuple(s: EntropyStats):
    return (s.q, s.sigma, s.z_pos, s.z_neg)


def test_hand_worked_stats():
    # log-entropies 0, 1, 2, 3, 4: pivot index round(0.8 * 4) = 3 → q = 3
    ent = torch.tensor([[math.exp(k) for k in range(5)]], dtype=torch.float64)
    s = entropy_stats(ent, torch.ones_like(ent))
    assert s.q == pytest.approx(3.0)
    sigma = math.sqrt((9 + 4 + 1 + 0 + 1) / 5)  # RMS about the pivot, not the std about the mean
    assert s.sigma == pytest.approx(sigma)
    assert s.z_pos == pytest.approx(1 / sigma)
    assert s.z_neg == pytest.approx(-3 / sigma)
    h = normalized_entropy(ent, s)
    assert torch.allclose(h, torch.tensor([[-1.0, -2 / 3, -1 / 3, 0.0, 1.0]], dtype=torch.float64))
    released = normalized_entropy(ent, s, sign_mode="released")
    assert torch.allclose(released, torch.tensor([[1.0, 2 / 3, 1 / 3, 0.0, 1.0]], dtype=torch.float64))


@given(token_batch(), st.sampled_from([0.0, 0.5, 0.8, 1.0]))
def test_stats_match_reference(batch, pivot):
    ent, mask = batch
    got = entropy_stats(ent, mask, pivot=pivot)
    want = ref.entropy_stats(ref.flat_valid(ent.tolist(), mask.tolist()), pivot=pivot)
    assert stats_tuple(got) == pytest.approx(want, rel=1e-12, abs=1e-12)


@given(token_batch(), st.sampled_from(["signed", "released"]))
def test_normalized_entropy_matches_reference_and_range(batch, mode):
    ent, mask = batch
    s = entropy_stats(ent, mask)
    h = normalized_entropy(ent, s, sign_mode=mode)
    want = [[ref.h_tilde(v, stats_tuple(s), mode) for v in row] for row in ent.tolist()]
    assert torch.allclose(h, torch.tensor(want, dtype=torch.float64), atol=1e-12)
    assert bool((h >= -1).all() and (h <= 1).all())
    valid = h[mask]
    if mode == "released":
        assert bool((valid >= 0).all()), "released mode mirrors confident tokens to [0, 1]"
    else:
        # the extremes of the reference set reach ±1 exactly when both sides exist
        ell = torch.log(ent[mask].clamp(min=1e-8))
        if bool((ell > ell.sort().values[round(0.8 * (ell.numel() - 1))]).any()):
            assert valid.max().item() == pytest.approx(1.0)
        if bool((ell < ell.sort().values[round(0.8 * (ell.numel() - 1))]).any()):
            assert valid.min().item() == pytest.approx(-1.0)


@given(token_batch(), st.data())
def test_padding_never_changes_stats(batch, data):
    ent, mask = batch
    garbage = ent.clone()
    garbage[~mask] = data.draw(st.sampled_from([float("nan"), float("inf"), -5.0, 0.0, 1e9]))
    assert entropy_stats(garbage, mask) == entropy_stats(ent, mask)
    # same valid tokens laid out differently (more padding, another order) → same stats
    flat = ent[mask]
    perm = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))]
    padded = torch.cat([perm, torch.full((3,), 7.0, dtype=ent.dtype)]).view(1, -1)
    pmask = torch.cat([torch.ones_like(perm, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)]).view(1, -1)
    assert stats_tuple(entropy_stats(padded, pmask)) == pytest.approx(stats_tuple(entropy_stats(ent, mask)), rel=1e-15)


def test_float32_input_keeps_dtype_and_is_close():
    torch.manual_seed(0)
    ent = torch.rand(8, 16, dtype=torch.float64) * 4
    mask = torch.rand(8, 16) > 0.3
    s64 = entropy_stats(ent, mask)
    s32 = entropy_stats(ent.float(), mask)
    assert stats_tuple(s32) == pytest.approx(stats_tuple(s64), rel=1e-5)
    h = normalized_entropy(ent.float(), s32)
    assert h.dtype == torch.float32
    assert torch.allclose(h.double(), normalized_entropy(ent, s64), atol=1e-5)


def test_degenerate_single_token_and_constant_entropy():
    s = entropy_stats(torch.tensor([[0.7]]), torch.tensor([[1]]))
    assert s.sigma == pytest.approx(math.sqrt(1e-8)) and s.z_pos == 1e-8 and s.z_neg == -1e-8
    const = torch.full((3, 4), 2.0)
    s = entropy_stats(const, torch.ones(3, 4))
    assert torch.equal(normalized_entropy(const, s), torch.zeros(3, 4))
    # zero entropy (a one-hot distribution) is floored at eps, not -inf
    s = entropy_stats(torch.tensor([[0.0, 1.0, 2.0]]), torch.ones(1, 3))
    assert math.isfinite(s.q) and math.isfinite(s.z_neg)


@given(token_batch(), st.floats(0.1, 3.0), st.floats(0.0, 0.5))
def test_adaptive_temperature(batch, base, tau):
    ent, mask = batch
    s = entropy_stats(ent, mask)
    temp = adaptive_temperature(ent, s, base_temperature=base, tau=tau)
    h = normalized_entropy(ent, s)
    assert torch.allclose(temp, base * (1 + tau * h))
    assert bool((temp >= base * (1 - tau) - 1e-12).all() and (temp <= base * (1 + tau) + 1e-12).all())
    # uncertain tokens get hotter than confident ones
    order = torch.argsort(ent[mask])
    assert bool((temp[mask][order].diff() >= -1e-12).all())


def test_adaptive_temperature_without_stats_is_base():
    ent = torch.rand(2, 3)
    assert torch.equal(adaptive_temperature(ent, None, base_temperature=0.7), torch.full((2, 3), 0.7))


def test_stats_roundtrip_dict():
    s = entropy_stats(torch.rand(4, 4) + 0.1, torch.ones(4, 4))
    assert EntropyStats.from_dict(s.to_dict()) == s
