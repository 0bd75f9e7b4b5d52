"""Megatron (TP 1/2, PP 1/2) → colocated vLLM engines on every rank: after an update, the engine
computes what the trainer computes; a skipped sync shows in the mismatch metric."""
import pytest
import torch

from .distributed import run_ranks


def sync_worker(rank, world, tp, pp, tmp):
    from megatron.core import parallel_state as ps

    from megatron_hapo.algorithms import AlgorithmConfig, logprob_mismatch
    from megatron_hapo.models.hf_config import ModelSpec
    from megatron_hapo.rollout.engine import RolloutEngine
    from megatron_hapo.rollout.weight_sync import sync_policy_to_engine
    from megatron_hapo.training.parallel import init_model_parallel
    from megatron_hapo.training.policy import MegatronPolicy, PolicyBatch, PolicyConfig

    from .tiny_models import hf_model

    init_model_parallel(tp, pp)
    import torch.distributed as dist

    hf = hf_model("qwen2", vocab_size=256, hidden_size=128, intermediate_size=256)
    path = f"{tmp}/model"
    if rank == 0:  # transformers writes from the main process only under torch.distributed
        hf.save_pretrained(path)
    dist.barrier()
    engine = RolloutEngine(path, max_model_len=64, kv_cache_memory_bytes=32 * 2**20, seed=rank)
    policy = MegatronPolicy(ModelSpec.from_hf(hf.config),
                            PolicyConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, micro_batch_size=2,
                                         lr=3e-3, lr_warmup_steps=0), AlgorithmConfig.preset("dapo"))
    policy.load_hf_state_dict(hf.state_dict())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (4, 20), generator=g)
    mask = torch.zeros(4, 20, dtype=torch.bool)
    mask[:, 4:19] = True
    batch = PolicyBatch(ids, mask)

    def mismatch():
        trainer, _ = policy.compute_logprobs(batch)
        eng = torch.tensor(engine.score(ids.tolist()))  # position t scores token t+1, like the trainer
        return logprob_mismatch(eng, trainer[:, :-1], mask[:, :-1])

    out = {"initial": mismatch()}
    old, _ = policy.compute_logprobs(batch)
    policy.train_step(PolicyBatch(ids, mask, advantages=torch.tensor([1.0, -1.0, 1.0, -1.0]), old_logp=old))
    out["stale"] = mismatch()
    out["sync"] = sync_policy_to_engine(policy, engine, bucket_bytes=64 * 1024)  # small buckets: many broadcasts
    out["synced"] = mismatch()
    ps.destroy_model_parallel()
    return out


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)])
def test_engine_matches_trainer_after_sync(tp, pp, tmp_path):
    world = tp * pp
    for r in run_ranks(world, sync_worker, tp, pp, str(tmp_path), timeout=600):
        assert r["initial"]["logp_mismatch_max"] < 1e-4, r["initial"]
        assert r["stale"]["logp_mismatch_mean"] > 1e-2, r["stale"]  # a skipped sync is visible
        assert r["synced"]["logp_mismatch_max"] < 1e-4, r["synced"]
        assert r["sync"]["weight_sync_bytes"] > 0


def test_pipeline_buckets_keep_one_dtype_and_a_size_cap():
    """PP stages stream their tensors in buckets: each bucket has one dtype (a mixed bucket would be
    cast to its first tensor's dtype) and at most bucket_bytes, a larger tensor travelling alone."""
    from megatron_hapo.training.weights import _buckets

    f32, bf16 = torch.float32, torch.bfloat16
    sizes = [(40, f32), (40, f32), (40, f32), (200, f32), (10, bf16), (10, bf16), (10, f32)]
    assert _buckets(sizes, 100) == [[0, 1], [2], [3], [4, 5], [6]]
    assert _buckets([], 100) == []
