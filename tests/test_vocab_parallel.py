"""vocab_parallel_logprobs_and_entropy against a float64 full-vocabulary reference, at TP = 1, 2, 4."""
import math

import pytest
import torch

from megatron_hapo.parallel import vocab_parallel_logprobs_and_entropy as vp

from .distributed import run_ranks


def reference(full_logits, target, temperature, vocab_size):
    """float64 log_softmax over the true vocabulary; returns (logp, entropy) with autograd."""
    x = full_logits[..., :vocab_size].to(torch.float64) / temperature.to(torch.float64)[..., None]
    logp_all = torch.log_softmax(x, dim=-1)
    p = logp_all.exp()
    logp = logp_all.gather(-1, target[..., None]).squeeze(-1)
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    return logp, entropy


def make_case(name, seed=0):
    """(full logits [.., Vp], target, temperature, vocab_size, tolerance) for one named case."""
    g = torch.Generator().manual_seed(seed)
    b, s, vp_size = 3, 7, 96  # divisible by 1, 2, 4
    vocab = vp_size
    logits = torch.randn(b, s, vp_size, generator=g) * 3
    temp = torch.ones(b, s)
    tol = 2e-5
    if name == "temperature":
        temp = torch.exp(torch.empty(b, s).uniform_(math.log(0.05), math.log(10.0), generator=g))
    if name == "bf16":
        logits = logits.to(torch.bfloat16)
        tol = 5e-5  # the reference sees the same bf16 values; compute is fp32 in both
    if name == "neg_inf":
        logits[torch.rand(b, s, vp_size, generator=g) < 0.3] = -torch.inf
    if name == "padded":
        vocab = vp_size - 13  # Megatron pads the vocabulary; padding holds whatever the model computed
        logits[..., vocab:] = 50.0
    target = torch.randint(0, vocab, (b, s), generator=g)
    if name == "neg_inf":
        # targets must have finite logits (a −inf target has log-prob −inf, checked separately)
        finite = torch.isfinite(logits)
        target = torch.where(finite.gather(-1, target[..., None]).squeeze(-1), target, logits.argmax(-1))
    # every shard holds some target
    target.view(-1)[: 4] = torch.tensor([0, vp_size // 4, vp_size // 2 + 1, min(vocab, vp_size) - 1])
    return logits, target, temp, vocab, tol


CASES = ["plain", "temperature", "bf16", "neg_inf", "padded", "noncontiguous"]


def check_case(name, rank, world, group, chunk_size, entropy_grad):
    logits, target, temp, vocab, tol = make_case(name)
    full = logits
    shard = full.shape[-1] // world
    local = full[..., rank * shard:(rank + 1) * shard].clone()
    if name == "noncontiguous":
        local = local.transpose(0, 1).contiguous().transpose(0, 1)  # Megatron's [s, b, V] seen as [b, s, V]
        assert not local.is_contiguous()
    before = local.clone()
    x = local.requires_grad_()
    logp, ent = vp(x, target, temp if name in ("temperature",) else (temp if name != "plain" else 1.0),
                   group=group, chunk_size=chunk_size, vocab_size=vocab, entropy_grad=entropy_grad)
    ref_in = full.to(torch.float64).requires_grad_()
    r_logp, r_ent = reference(ref_in, target, temp, vocab)
    assert torch.equal(local.detach(), before), "input logits were modified"
    assert torch.allclose(logp.double(), r_logp.detach(), rtol=tol, atol=tol), (name, (logp.double() - r_logp).abs().max())
    assert torch.allclose(ent.double(), r_ent.detach(), rtol=tol, atol=tol), (name, (ent.double() - r_ent).abs().max())
    g = torch.Generator().manual_seed(1)
    g_lp, g_h = torch.randn(target.shape, generator=g), torch.randn(target.shape, generator=g)
    out = (logp * g_lp).sum() + ((ent * g_h).sum() if entropy_grad else 0)
    out.backward()
    r_out = (r_logp * g_lp.double()).sum() + ((r_ent * g_h.double()).sum() if entropy_grad else 0)
    r_out.backward()
    want = ref_in.grad[..., rank * shard:(rank + 1) * shard]
    got = x.grad.double()
    assert x.grad.dtype == local.dtype and x.grad.shape == local.shape
    # a bf16 gradient is stored in bf16: allow its rounding (half an ulp, 2^-9 relative), no more
    g_rtol, g_atol = (2.0**-8, 1e-6) if local.dtype == torch.bfloat16 else (tol, tol * 4)
    assert torch.allclose(got, want, rtol=g_rtol, atol=g_atol), (name, (got - want).abs().max())
    if not entropy_grad:
        assert not ent.requires_grad


def tp_worker(rank, world):
    import torch.distributed as dist

    group = dist.group.WORLD
    done = 0
    for name in CASES:
        for chunk_size in (None, 4):
            for entropy_grad in (False, True):
                check_case(name, rank, world, group, chunk_size, entropy_grad)
                done += 1
    # a −inf target gives log-prob −inf, not NaN, and finite gradients elsewhere
    logits = torch.zeros(1, 2, 8 * world)
    logits[0, 0, 5] = -torch.inf
    shard = logits[..., rank * 8:(rank + 1) * 8].clone().requires_grad_()
    logp, ent = vp(shard, torch.tensor([[5, 1]]), group=group)
    assert logp[0, 0].item() == -math.inf and math.isfinite(logp[0, 1].item())
    logp[0, 1].backward()
    assert bool(torch.isfinite(shard.grad).all())
    return done


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_matches_reference(world):
    assert run_ranks(world, tp_worker) == [len(CASES) * 4] * world


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("chunk_size", [None, 1, 5, 1000])
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_single_process_matches_reference(name, chunk_size, entropy_grad):
    check_case(name, 0, 1, None, chunk_size, entropy_grad)


def test_gradcheck_float64():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 9, (2, 3))
    temp = torch.rand(2, 3, dtype=torch.float64) + 0.3

    def f(x):
        lp, h = vp(x, target, temp, chunk_size=2, vocab_size=9, entropy_grad=True)
        return lp, h

    assert torch.autograd.gradcheck(f, (logits,))


def test_scalar_and_tensor_temperature_agree():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 32)
    target = torch.randint(0, 32, (4, 5))
    a = vp(logits, target, 0.7)
    b = vp(logits, target, torch.full((4, 5), 0.7))
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_ids=torch.zeros(3, 4, dtype=torch.long)), "target_ids: shape"),
        (dict(target_ids=torch.full((2, 3), 16)), "target_ids: id 16 lies outside"),
        (dict(target_ids=torch.full((2, 3), -1)), "outside the vocabulary"),
        (dict(target_ids=torch.full((2, 3), 12), vocab_size=10), "id 12 lies outside"),
        (dict(target_ids=torch.zeros(2, 3)), "target_ids: expected an integer"),
        (dict(temperature=0.0), "temperature: must be positive"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])), "temperature: every temperature"),
        (dict(temperature=torch.ones(3)), "temperature: shape"),
        (dict(vocab_size=17), "vocab_size"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(logits=torch.zeros(2, 3, 16, dtype=torch.long)), "logits: expected a floating"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(logits=torch.zeros(2, 3, 16), target_ids=torch.zeros(2, 3, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        vp(**args)
