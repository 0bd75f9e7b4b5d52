"""Megatron policy training: the same loss, gradient norm and updated weights under every layout.

Reference: TP = PP = DP = 1, one micro-batch. Compared: 4 micro-batches, TP = 2, PP = 2, DP = 2,
and TP = 2 × PP = 2, for HAPO (Qwen3-shaped), DAPO (Qwen2, tied embeddings) and GRPO (Llama).
Three rows are multi-turn samples: a tool's tokens sit between model tokens, unscored.
Real gloo processes, real megatron-core schedules and optimizer.
"""
import pytest
import torch

from .distributed import run_ranks

ALGOS = {"hapo": "qwen3", "dapo": "qwen2", "grpo": "llama"}
B, S = 8, 14
PACK = 24  # tokens per packed micro-batch: one or two of the 8..14-token sequences
TOOL_TOKENS = {0: (5, 7), 2: (3, 5), 7: (4, 7)}  # row: label positions of a tool's tokens


def global_batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 200, (B, S), generator=g)
    prompt = torch.randint(2, 6, (B,), generator=g)
    total = torch.randint(8, S + 1, (B,), generator=g)
    pos = torch.arange(S)
    # position t scores token t+1: response tokens are prompt..total-1
    mask = (pos[None] >= prompt[:, None] - 1) & (pos[None] < total[:, None] - 1)
    # multi-turn samples: rows 0, 2 and 7 hold a tool's result between model tokens, never scored
    for row, (start, end) in TOOL_TOKENS.items():
        mask[row, start:end] = False
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    groups = [0, 0, 0, 0, 1, 1, 1, 1]
    return ids, mask, rewards, groups


def run_layout(rank, world, tp, pp, n_micro, algo_name, family, steps=2, dist_opt=False, pack=0, sp=False):
    from megatron.core import parallel_state as ps

    from megatron_hapo.algorithms import AlgorithmConfig, compute_advantages, normalized_entropy
    from megatron_hapo.models.hf_config import ModelSpec
    from megatron_hapo.parallel import distributed_entropy_stats
    from megatron_hapo.training.parallel import init_model_parallel
    from megatron_hapo.training.policy import MegatronPolicy, PolicyBatch, PolicyConfig

    from .tiny_models import hf_model

    init_model_parallel(tp, pp)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    hf = hf_model(family)
    spec = ModelSpec.from_hf(hf.config)
    algo = AlgorithmConfig.preset(algo_name)
    cfg = PolicyConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, micro_batch_size=B // dp // n_micro,
                       lr=4e-5, adam_eps=1e-2, lr_warmup_steps=0, clip_grad=1.0, logprob_chunk_size=5,
                       use_distributed_optimizer=dist_opt, max_tokens_per_micro_batch=pack,
                       sequence_parallel=sp)
    policy = MegatronPolicy(spec, cfg, algo)
    policy.load_hf_state_dict(hf.state_dict())

    ids, mask, rewards, groups = global_batch()
    adv, _ = compute_advantages(algo, rewards, mask.sum(-1), groups)
    mine = slice(dp_rank * B // dp, (dp_rank + 1) * B // dp)
    batch = PolicyBatch(ids[mine], mask[mine])
    old_logp, old_ent = policy.compute_logprobs(batch)
    h_hat = None
    if algo.uses_entropy:
        stats = distributed_entropy_stats(old_ent, batch.loss_mask, group=ps.get_data_parallel_group())
        h_hat = normalized_entropy(old_ent, stats)
    train = PolicyBatch(ids[mine], mask[mine], advantages=adv[mine], old_logp=old_logp, h_hat=h_hat)
    metrics = [policy.train_step(train) for _ in range(steps)]
    new_logp, _ = policy.compute_logprobs(batch)
    weights = policy.hf_state_dict()
    tokens = policy.take_token_counts()
    with torch.no_grad():  # the same weights in Hugging Face transformers, float64
        ref = torch.log_softmax(hf.double()(ids[mine]).logits, -1)[:, :-1].gather(-1, ids[mine][:, 1:, None]).squeeze(-1)
    ps.destroy_model_parallel()
    return dict(metrics=metrics, weights=weights, old_logp=old_logp, new_logp=new_logp, mine=(mine.start, mine.stop),
                adv=adv[mine], hf_logp=torch.where(batch.loss_mask[:, :-1], ref, 0.0).float(), tokens=tokens)


def layouts_worker(rank, world, layouts):
    out = {}
    for name, (tp, pp, n_micro, *opt) in layouts.items():
        for algo, family in ALGOS.items():
            out[(name, algo)] = run_layout(rank, world, tp, pp, n_micro, algo, family, *opt)
    return out


@pytest.fixture(scope="module")
def reference():
    return run_ranks(1, layouts_worker, {"ref": (1, 1, 1), "micro4": (1, 1, 4), "packed": (1, 1, 1, 2, False, PACK)},
                     timeout=600)[0]


def assert_same(ref, got, label):
    for step, (a, b) in enumerate(zip(ref["metrics"], got["metrics"])):
        # the loss is a mean of ~80 O(1) terms that nearly cancel: fp32 summation in another order
        # (micro-batches, packed rows, TP) moves it by up to n·eps ≈ 5e-6 absolute, and TP's vocab-parallel
        # log-softmax moves each term's log-prob by ~1e-7 besides (|A| up to 2): 1.04e-5 seen at TP 2 on an
        # AVX2 machine, so 2e-5; grad norms, clip fractions and weights stay compared as tightly as before
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=2e-5), (label, step, "loss")
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (label, step, "grad_norm")
        for k in ("clip_frac_low", "clip_frac_high", "hapo_adv_changed_frac", "hapo_bounds_changed_frac", "tokens"):
            assert b[k] == pytest.approx(a[k], abs=1e-9), (label, step, k)
    assert ref["weights"].keys() == got["weights"].keys()
    for k, w in ref["weights"].items():
        assert torch.allclose(got["weights"][k], w, rtol=1e-4, atol=2e-6), (label, k, (got["weights"][k] - w).abs().max())


def test_batch_holds_tool_tokens_between_model_tokens():
    _, mask, _, _ = global_batch()
    for row in TOOL_TOKENS:
        scored = mask[row].nonzero().squeeze(-1)
        gaps = (scored[1:] - scored[:-1]) > 1
        assert int(gaps.sum()) == 1 and int(scored.numel()) >= 4, (row, mask[row])


def test_ratios_stay_away_from_hapo_band_edges(reference):
    """HAPO C switches at r = 1 − ε_L/2 and 1 + ε_H/2: a token sitting on an edge could flip between
    layouts on fp32 noise. The learning rate keeps step-2 ratios well inside, so the comparison is fair."""
    _, mask, _, _ = global_batch()
    for algo in ALGOS:
        r = reference[("ref", algo)]
        drift = (r["new_logp"] - r["old_logp"]).abs()[mask]
        assert 0 < drift.max().item() < 0.05, (algo, drift.max())


def test_megatron_model_matches_transformers(reference):
    """Qwen3 (qk-norm), Qwen2 (qkv bias, tied) and Llama built from their HF configs reproduce the
    transformers forward on the same weights."""
    for algo, family in ALGOS.items():
        r = reference[("ref", algo)]
        assert torch.allclose(r["old_logp"][:, :-1], r["hf_logp"], atol=2e-5), (family, (r["old_logp"][:, :-1] - r["hf_logp"]).abs().max())


def test_micro_batches_do_not_change_the_update(reference):
    for algo in ALGOS:
        assert_same(reference[("ref", algo)], reference[("micro4", algo)], f"micro4/{algo}")


def test_packed_micro_batches_give_the_padded_update(reference):
    """Token-budget micro-batches of packed sequences (block-diagonal attention, positions restarting
    per sequence): the same log-probs, loss, gradient norm and weights as padded rows, for the
    token-mean (HAPO, DAPO) and the sequence-mean (GRPO) losses; fewer tokens computed."""
    for algo in ALGOS:
        ref, got = reference[("ref", algo)], reference[("packed", algo)]
        assert_same(ref, got, f"packed/{algo}")
        assert torch.allclose(got["old_logp"], ref["old_logp"], atol=1e-5)
        assert got["tokens"]["tokens_real"] == ref["tokens"]["tokens_real"]
        assert got["tokens"]["tokens_computed"] < ref["tokens"]["tokens_computed"]


def test_two_rank_layouts_match_reference(reference):
    layouts = {"tp2": (2, 1, 2), "pp2": (1, 2, 2), "dp2": (1, 1, 2), "dp2_distributed_optimizer": (1, 1, 1, 2, True),
               "tp2_packed": (2, 1, 1, 2, False, PACK), "pp2_packed": (1, 2, 1, 2, False, PACK),
               "dp2_packed": (1, 1, 1, 2, False, PACK),
               # sequence parallelism on the local spec (the norm marks its weight; Megatron reduces it over TP)
               "tp2_sp": (2, 1, 2, 2, False, 0, True), "tp2_sp_packed": (2, 1, 1, 2, False, PACK, True)}
    results = run_ranks(2, layouts_worker, layouts, timeout=600)
    for name in layouts:
        for algo in ALGOS:
            ref = reference[("ref", algo)]
            for rank_result in results:
                got = rank_result[(name, algo)]
                assert_same(ref, got, f"{name}/{algo}")
                lo, hi = got["mine"]
                assert torch.allclose(got["old_logp"], ref["old_logp"][lo:hi], atol=1e-5)


def test_tp2_pp2_matches_reference(reference):
    results = run_ranks(4, layouts_worker, {"tp2pp2": (2, 2, 1)}, timeout=600)
    for algo in ALGOS:
        for rank_result in results:
            assert_same(reference[("ref", algo)], rank_result[("tp2pp2", algo)], f"tp2pp2/{algo}")


def test_update_moves_logprobs_in_the_direction_of_the_advantage(reference):
    ids, mask, _, _ = global_batch()
    for algo in ALGOS:
        r = reference[("ref", algo)]
        delta = ((r["new_logp"] - r["old_logp"]) * mask).sum(-1) / mask.sum(-1)
        pos, neg = r["adv"] > 0, r["adv"] < 0
        assert bool((delta[pos] > 0).all()), (algo, delta, r["adv"])
        assert bool((delta[neg] < 0).all()), (algo, delta, r["adv"])
