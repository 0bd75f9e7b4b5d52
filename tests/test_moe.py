"""Qwen3-MoE with expert parallelism (real gloo processes, a tiny Qwen3-MoE built in code):
HF parity of log-probs against transformers in float64, EP 2 == EP 1 through two HAPO steps, the
HF ↔ Megatron mapping (experts gathered over EP) exact both ways."""
import pytest
import torch

from .distributed import run_ranks
from .test_policy_layouts import B, global_batch

VOCAB = 512


def moe_layout(rank, world, ep, algo_name="hapo", steps=2, **overrides):
    from megatron.core import parallel_state as ps

    from megatron_hapo.algorithms import AlgorithmConfig, compute_advantages, normalized_entropy
    from megatron_hapo.models.hf_config import ModelSpec
    from megatron_hapo.models.mapping import unfuse_hf_experts
    from megatron_hapo.parallel import distributed_entropy_stats
    from megatron_hapo.training.parallel import init_model_parallel
    from megatron_hapo.training.policy import MegatronPolicy, PolicyBatch, PolicyConfig

    from .tiny_models import hf_model

    init_model_parallel(1, 1, ep=ep)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    hf = hf_model("qwen3_moe", vocab_size=VOCAB, **overrides)
    spec = ModelSpec.from_hf(hf.config)
    algo = AlgorithmConfig.preset(algo_name)
    cfg = PolicyConfig(expert_model_parallel_size=ep, micro_batch_size=2, lr=4e-5, adam_eps=1e-2, lr_warmup_steps=0,
                       clip_grad=1.0, logprob_chunk_size=5)
    policy = MegatronPolicy(spec, cfg, algo)
    policy.load_hf_state_dict(hf.state_dict())
    start = policy.hf_state_dict()
    want = unfuse_hf_experts(hf.state_dict())

    ids, mask, rewards, groups = global_batch()
    ids = ids * 2 + 7  # the whole vocabulary's range
    adv, _ = compute_advantages(algo, rewards, mask.sum(-1), groups)
    mine = slice(dp_rank * B // dp, (dp_rank + 1) * B // dp)
    batch = PolicyBatch(ids[mine], mask[mine])
    old_logp, _ = policy.compute_logprobs(batch)
    # the loss's inputs from the float64 reference, identical in every layout (HAPO's redistribution
    # and bounds depend on the entropies' order around the pivot: 1e-7 apart layouts may differ there)
    with torch.no_grad():
        logits = hf.double()(ids[mine]).logits
        lsm = torch.log_softmax(logits, -1)
        ref = lsm[:, :-1].gather(-1, ids[mine][:, 1:, None]).squeeze(-1)
        ref_logp = torch.nn.functional.pad(ref, (0, 1)).float() * batch.loss_mask
        ref_ent = -(lsm.exp() * lsm).sum(-1).float() * batch.loss_mask
    stats = distributed_entropy_stats(ref_ent, batch.loss_mask, group=ps.get_data_parallel_group())
    train = PolicyBatch(ids[mine], mask[mine], advantages=adv[mine], old_logp=ref_logp,
                        h_hat=normalized_entropy(ref_ent, stats) if algo.uses_entropy else None)
    metrics = [policy.train_step(train) for _ in range(steps)]
    weights = policy.hf_state_dict()
    ps.destroy_model_parallel()
    m = batch.loss_mask[:, :-1]
    return dict(old_logp=old_logp, hf_err=(old_logp[:, :-1].double() - ref).abs()[m].max().item(), metrics=metrics, weights=weights,
                mapping_exact=set(start) == set(want) and all(torch.equal(start[k], want[k]) for k in want),
                moved=max((weights[k] - start[k]).abs().max().item() for k in start if ".experts." in k))


def moe_worker(rank, world):
    return {"ep1": moe_layout(rank, world, 1), "ep2": moe_layout(rank, world, 2),
            "ep2_softmax_topk": moe_layout(rank, world, 2, steps=0, norm_topk_prob=False)}


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return run_ranks(2, moe_worker)


def test_log_probs_match_transformers_in_float64(moe):
    for name in ("ep1", "ep2", "ep2_softmax_topk"):  # top-k renormalized, and softmax over all experts
        for rank in range(2):
            assert moe[rank][name]["hf_err"] < 2e-5, (name, rank, moe[rank][name]["hf_err"])


def test_mapping_gathers_every_expert_exactly(moe):
    for name in ("ep1", "ep2"):
        assert all(moe[rank][name]["mapping_exact"] for rank in range(2)), name


def test_ep2_trains_like_ep1(moe):
    a, b = moe[0]["ep1"], moe[0]["ep2"]
    for ma, mb in zip(a["metrics"], b["metrics"]):
        assert abs(ma["loss"] - mb["loss"]) < 1e-6, (ma["loss"], mb["loss"])
        assert abs(ma["grad_norm"] - mb["grad_norm"]) < 1e-5 * max(1.0, ma["grad_norm"]), (ma["grad_norm"], mb["grad_norm"])
    assert a["moved"] > 1e-6, "the experts did not train"
    for k in a["weights"]:
        d = (a["weights"][k] - b["weights"][k]).abs().max().item()
        assert d < 1e-6, (k, d)
    for rank in range(2):  # every rank holds the same complete weights after the gather
        for k in a["weights"]:
            assert torch.equal(moe[rank]["ep2"]["weights"][k], b["weights"][k]), k
