"""Entropy statistics over a data-parallel group equal the single-process result on all tokens."""
import pytest
import torch

from megatron_hapo.algorithms import entropy_stats
from megatron_hapo.parallel import distributed_entropy_stats, distributed_quantile

from .distributed import run_ranks


def rank_tokens(seed, rank, dtype=torch.float32):
    """Different token counts per rank (rank 2 has no valid token), with ties and tiny entropies."""
    g = torch.Generator().manual_seed(seed * 100 + rank)
    rows = [5, 3, 2, 7][rank % 4]
    ent = (torch.rand(rows, 11, generator=g, dtype=torch.float64) * 4).to(dtype)
    ent[0, :3] = 1.5  # ties across ranks
    ent[-1, -1] = 0.0  # floored at eps
    mask = torch.rand(rows, 11, generator=g) > 0.3
    if rank == 2:
        mask[:] = False
    return ent, mask


def single_process(seed, world, dtype, pivot):
    parts = [rank_tokens(seed, r, dtype) for r in range(world)]
    ent = torch.cat([e[m] for e, m in parts]).view(1, -1)
    return entropy_stats(ent, torch.ones_like(ent, dtype=torch.bool), pivot=pivot)


def dp_worker(rank, world):
    import torch.distributed as dist

    checked = 0
    for seed in range(4):
        for dtype in (torch.float32, torch.float64):
            for pivot in (0.0, 0.8, 0.5, 1.0):
                ent, mask = rank_tokens(seed, rank, dtype)
                got = distributed_entropy_stats(ent, mask, group=dist.group.WORLD, pivot=pivot)
                want = single_process(seed, world, dtype, pivot)
                assert got.q == want.q, (seed, dtype, pivot, got, want)  # exact: the same element
                assert got.sigma == pytest.approx(want.sigma, rel=1e-12)
                assert got.z_pos == pytest.approx(want.z_pos, rel=1e-12)
                assert got.z_neg == pytest.approx(want.z_neg, rel=1e-12)
                checked += 1
    # TP x DP: ranks {0,1} and {2,3} are TP pairs holding the same tokens; stats run over DP groups
    if world == 4:
        dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        dp_rank = rank // 2
        ent, mask = rank_tokens(7, dp_rank)
        got = distributed_entropy_stats(ent, mask, group=dp_groups[rank % 2])
        want = single_process(7, 2, torch.float32, 0.8)
        assert got.q == want.q and got.sigma == pytest.approx(want.sigma, rel=1e-12)
        checked += 1
    # no valid token anywhere is an error on every rank, not a hang
    with pytest.raises(ValueError, match="no tokens on any rank"):
        distributed_quantile(torch.empty(0), 0.8, dist.group.WORLD)
    return checked


@pytest.mark.parametrize("world", [2, 4])
def test_dp_stats_equal_single_process(world):
    counts = run_ranks(world, dp_worker)
    assert counts == [32 + (world == 4)] * world


def test_quantile_bisection_single_process_matches_sort():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(1001, dtype=dtype) * 10
        x[::7] = -0.0
        x[::11] = 0.0
        for pivot in (0.0, 0.1, 0.8, 0.999, 1.0):
            q, n = distributed_quantile(x, pivot)
            assert n == 1001 and q == x.sort().values[round(pivot * 1000)].item()
