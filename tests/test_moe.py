"""Qwen3-MoE with expert parallelism (real gloo processes, a tiny Qwen3-MoE built in code):
HF parity of log-probs against transformers in float64, EP 2 == EP 1 through two HAPO steps, the
HF ↔ Megatron mapping (experts gathered over EP) exact both ways."""
import pytest
import torch

from .distributed import run_ranks
from .test_policy_layouts import B, global_batch

VOCAB = 512


def moe_layout(rank, world, ep, algo_name="hapo", steps=2, tp=1, etp=None, **overrides):
    from megatron.core import parallel_state as ps

    from megatron_hapo.algorithms import AlgorithmConfig, compute_advantages, normalized_entropy
    from megatron_hapo.models.hf_config import ModelSpec
    from megatron_hapo.models.mapping import unfuse_hf_experts
    from megatron_hapo.parallel import distributed_entropy_stats
    from megatron_hapo.training.parallel import init_model_parallel
    from megatron_hapo.training.policy import MegatronPolicy, PolicyBatch, PolicyConfig

    from .tiny_models import hf_model

    init_model_parallel(tp, 1, ep=ep, etp=etp)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    hf = hf_model("qwen3_moe", vocab_size=VOCAB, **overrides)
    spec = ModelSpec.from_hf(hf.config)
    algo = AlgorithmConfig.preset(algo_name)
    cfg = PolicyConfig(tensor_model_parallel_size=tp, sequence_parallel=tp > 1, expert_model_parallel_size=ep,
                       expert_tensor_parallel_size=etp, micro_batch_size=2, lr=4e-5, adam_eps=1e-2, lr_warmup_steps=0,
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


def aux_gradient(rank, world, ep, algo, coef=0.1, tp=1):
    """Zero advantages: the policy loss has no gradient, the router's is the aux loss's alone.
    Megatron's router gradients against float64 autograd of the objective the policy documents:
    coefficient × Σ over micro-batches (real tokens of the micro-batch / real tokens of the step)
    × E/(k·T²)·Σ_e P_e·f_e (Megatron's load-balancing loss, padding excluded)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_hapo.algorithms import AlgorithmConfig
    from megatron_hapo.models.hf_config import ModelSpec
    from megatron_hapo.training.parallel import init_model_parallel
    from megatron_hapo.training.batch import sequence_lengths
    from megatron_hapo.training.policy import MegatronPolicy, PolicyBatch, PolicyConfig

    from .tiny_models import hf_model

    init_model_parallel(tp, 1, ep=ep)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    hf = hf_model("qwen3_moe", vocab_size=VOCAB)
    spec = ModelSpec.from_hf(hf.config)
    mbs = 2
    policy = MegatronPolicy(spec, PolicyConfig(tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
                                               expert_model_parallel_size=ep, micro_batch_size=mbs, lr=1e-9, lr_warmup_steps=0,
                                               clip_grad=0.0, moe_aux_loss_coef=coef), AlgorithmConfig.preset(algo))
    policy.load_hf_state_dict(hf.state_dict())
    ids, mask, _, _ = global_batch()
    ids = ids * 2 + 7
    mine = slice(dp_rank * B // dp, (dp_rank + 1) * B // dp)
    zeros = torch.zeros(B)
    old, _ = policy.compute_logprobs(PolicyBatch(ids[mine], mask[mine]))
    policy.train_step(PolicyBatch(ids[mine], mask[mine], advantages=zeros[mine], old_logp=old))
    got = {i: layer.mlp.router.weight.main_grad.detach().double().clone()
           for i, layer in enumerate(policy.chunks[0].module.decoder.layers)}

    h = hf.double()
    logits = {}
    hooks = [layer.mlp.gate.register_forward_hook(lambda mod, inp, out, i=i: logits.__setitem__(i, out[0]))
             for i, layer in enumerate(h.model.layers)]
    lengths = sequence_lengths(mask)
    total = float(lengths.sum())
    objective = 0.0
    E, k = spec.num_experts, spec.moe_top_k
    for start in range(0, B, mbs):  # every rank's micro-batches: the gradient is summed over DP
        rows = slice(start, start + mbs)
        h(ids[rows])
        real = (torch.arange(ids.shape[1])[None] < lengths[rows, None]).reshape(-1)
        T = float(real.sum())
        for i, lg in logits.items():
            scores = torch.softmax(lg, -1)[real]
            top = torch.zeros_like(scores).scatter(1, scores.topk(k, dim=1).indices, 1.0)
            aux = E / (k * T * T) * (scores.sum(0) * top.sum(0)).sum()
            objective = objective + coef * (T / total) * aux
    objective.backward()
    for hook in hooks:
        hook.remove()
    want = {i: layer.mlp.gate.weight.grad for i, layer in enumerate(h.model.layers)}
    ps.destroy_model_parallel()
    dist.barrier()
    return {i: ((got[i] - want[i]).abs().max().item(), want[i].abs().max().item()) for i in got}


def round_trip_worker(rank, world, root):
    """HF folder → Megatron checkpoint (checked for EP 2) → HF folder, one process (EP 1), with --verify's check."""
    from safetensors.torch import load_file

    from megatron_hapo.models.convert import hf_to_megatron_checkpoint, megatron_to_hf_checkpoint, read_hf_tensors, verify

    from .tiny_models import hf_model

    hf_model("qwen3_moe", vocab_size=VOCAB).save_pretrained(f"{root}/hf")
    hf_to_megatron_checkpoint(f"{root}/hf", f"{root}/megatron", target_ep=2, progress=False)
    megatron_to_hf_checkpoint(f"{root}/megatron", f"{root}/back", progress=False)
    a, b = read_hf_tensors(f"{root}/hf"), load_file(f"{root}/back/model.safetensors")
    return {"same_names": set(a) == set(b), "bit_exact": all(torch.equal(a[k], b[k]) for k in a if k in b),
            "experts": sum(".mlp.experts." in k for k in a), "verify": verify(f"{root}/hf", f"{root}/megatron")}


def load_converted_at_ep2(rank, world, root):
    """The converted checkpoint loaded by the policy at EP 2: every expert lands where it belongs."""
    from megatron.core import parallel_state as ps

    from megatron_hapo.algorithms import AlgorithmConfig
    from megatron_hapo.models.convert import read_hf_tensors
    from megatron_hapo.models.hf_config import ModelSpec
    from megatron_hapo.training.checkpoint import load_model_checkpoint
    from megatron_hapo.training.parallel import init_model_parallel
    from megatron_hapo.training.policy import MegatronPolicy, PolicyConfig

    init_model_parallel(1, 1, ep=2)
    policy = MegatronPolicy(ModelSpec.from_hf(f"{root}/hf"), PolicyConfig(expert_model_parallel_size=2),
                            AlgorithmConfig.preset("hapo"))
    load_model_checkpoint(f"{root}/megatron", policy)
    got, want = policy.hf_state_dict(), read_hf_tensors(f"{root}/hf")
    ps.destroy_model_parallel()
    return set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def moe_worker(rank, world, root):
    return {"converted_at_ep2": load_converted_at_ep2(rank, world, root),"ep1": moe_layout(rank, world, 1), "ep2": moe_layout(rank, world, 2),
            "ep2_softmax_topk": moe_layout(rank, world, 2, steps=0, norm_topk_prob=False),
            # the gradient's divisor: sequences (GRPO, seq-mean) and response tokens (DAPO, token-mean)
            "aux_grpo": aux_gradient(rank, world, 2, "grpo"), "aux_dapo": aux_gradient(rank, world, 1, "dapo")}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_convert")
    return str(root), run_ranks(1, round_trip_worker, str(root))[0]


@pytest.fixture(scope="module")
def moe(converted):
    return run_ranks(2, moe_worker, converted[0])


def test_conversion_round_trip_is_bit_exact(converted):
    r = converted[1]
    assert r["same_names"] and r["bit_exact"] and r["experts"] == 2 * 8 * 3, r
    assert r["verify"] < 1e-4, r


def test_converted_checkpoint_loads_at_ep2(moe):
    assert moe[0]["converted_at_ep2"] and moe[1]["converted_at_ep2"]


def test_log_probs_match_transformers_in_float64(moe):
    for name in ("ep1", "ep2", "ep2_softmax_topk"):  # top-k renormalized, and softmax over all experts
        for rank in range(2):
            assert moe[rank][name]["hf_err"] < 2e-5, (name, rank, moe[rank][name]["hf_err"])


def test_aux_loss_gradient_is_the_documented_objective(moe):
    for rank in range(2):
        for name in ("aux_grpo", "aux_dapo"):
            for layer, (err, scale) in moe[rank][name].items():
                assert scale > 1e-4 and err < 1e-5 * scale, (name, rank, layer, err, scale)


def test_mapping_gathers_every_expert_exactly(moe):
    for name in ("ep1", "ep2"):
        assert all(moe[rank][name]["mapping_exact"] for rank in range(2)), name


def moe_tp_worker(rank, world):
    return {"tp2_ep2": moe_layout(rank, world, 2, tp=2), "tp2_ep2_etp1": moe_layout(rank, world, 2, tp=2, etp=1),
            "aux_tp2": aux_gradient(rank, world, 2, "dapo", tp=2)}


def test_tp2_ep2_with_sequence_parallelism_trains_like_tp1(moe):
    """4 ranks: TP 2 (sequence parallel, the local spec's norm) × EP 2 (experts split over the expert-TP
    group, and whole with ETP 1) × DP 2 == TP 1 × EP 1 × DP 2: loss, grad norm, weights after two HAPO steps."""
    results = run_ranks(4, moe_tp_worker, timeout=600)
    ref = moe[0]["ep1"]
    for name in ("tp2_ep2", "tp2_ep2_etp1"):
        for rank, r in enumerate(results):
            got = r[name]
            assert got["hf_err"] < 2e-5, (name, rank, got["hf_err"])
            for ma, mb in zip(ref["metrics"], got["metrics"]):
                assert abs(ma["loss"] - mb["loss"]) < 1e-6, (name, rank, ma["loss"], mb["loss"])
                assert abs(ma["grad_norm"] - mb["grad_norm"]) < 1e-5 * max(1.0, ma["grad_norm"]), (name, rank)
                assert abs(ma["moe_aux_loss"] - mb["moe_aux_loss"]) < 1e-5, (name, rank, ma["moe_aux_loss"], mb["moe_aux_loss"])
            for k in ref["weights"]:
                d = (ref["weights"][k] - got["weights"][k]).abs().max().item()
                assert d < 1e-6, (name, rank, k, d)
    for rank, r in enumerate(results):  # the aux loss's gradient: the documented objective under SP too
        for layer, (err, scale) in r["aux_tp2"].items():
            assert scale > 1e-4 and err < 1e-5 * scale, ("aux_tp2", rank, layer, err, scale)


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


def moe_sync_worker(rank, world, tmp):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_hapo.algorithms import AlgorithmConfig, logprob_mismatch
    from megatron_hapo.models.hf_config import ModelSpec
    from megatron_hapo.rollout import engine as engine_mod
    from megatron_hapo.rollout.engine import RolloutEngine
    from megatron_hapo.rollout.weight_sync import sync_policy_to_engine
    from megatron_hapo.training.parallel import init_model_parallel
    from megatron_hapo.training.policy import MegatronPolicy, PolicyBatch, PolicyConfig

    from .tiny_models import hf_model

    init_model_parallel(1, 1, ep=2)
    hf = hf_model("qwen3_moe", vocab_size=VOCAB)
    path = f"{tmp}/model"
    if rank == 0:
        hf.save_pretrained(path)
    dist.barrier()
    engine = RolloutEngine(path, max_model_len=64, kv_cache_memory_bytes=32 * 2**20, seed=rank)
    policy = MegatronPolicy(ModelSpec.from_hf(hf.config), PolicyConfig(expert_model_parallel_size=2, micro_batch_size=2,
                                                                       lr=3e-3, lr_warmup_steps=0),
                            AlgorithmConfig.preset("dapo"))
    policy.load_hf_state_dict(hf.state_dict())
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, VOCAB, (4, 20), generator=g)
    mask = torch.zeros(4, 20, dtype=torch.bool)
    mask[:, 4:19] = True
    batch = PolicyBatch(ids, mask)

    def mismatch():
        trainer, _ = policy.compute_logprobs(batch)
        eng = torch.tensor(engine.score(ids.tolist()))
        return logprob_mismatch(eng, trainer[:, :-1], mask[:, :-1])

    out = {"initial": mismatch()}
    old, _ = policy.compute_logprobs(batch)
    policy.train_step(PolicyBatch(ids, mask, advantages=torch.tensor([1.0, -1.0, 1.0, -1.0]), old_logp=old))
    out["stale"] = mismatch()
    prepare = engine_mod._prepare_experts
    engine_mod._prepare_experts = lambda worker: 0  # vLLM's own reload alone: what the preparation fixes
    sync_policy_to_engine(policy, engine)
    out["unprepared"] = mismatch()
    engine_mod._prepare_experts = prepare
    out["sync"] = sync_policy_to_engine(policy, engine, bucket_bytes=40 * 1024)  # the experts in several EP buckets
    out["synced"] = mismatch()
    out["layers_prepared"] = engine.llm.collective_rpc(prepare)[0]
    ps.destroy_model_parallel()
    return out


def test_engine_matches_trainer_after_sync_at_ep2(tmp_path):
    for r in run_ranks(2, moe_sync_worker, str(tmp_path), timeout=600):
        assert r["layers_prepared"] == 2
        assert r["initial"]["logp_mismatch_max"] < 1e-4, r["initial"]
        assert r["stale"]["logp_mismatch_mean"] > 1e-2, r["stale"]  # a skipped sync is visible
        assert r["synced"]["logp_mismatch_max"] < 1e-4, r["synced"]
        print(f"unprepared reload: mismatch max {r['unprepared']['logp_mismatch_max']:.2e}; "
              f"synced {r['synced']['logp_mismatch_max']:.2e}; stale mean {r['stale']['logp_mismatch_mean']:.2e}")


def moe_model_dir(path):
    """A tiny Qwen3-MoE with the addition task's tokenizer (vocabulary 32, special ids 0/1/2)."""
    import transformers

    from megatron_hapo.data.addition import BOS, EOS, PAD, VOCAB, build_tokenizer, save_model_dir

    config = transformers.AutoConfig.for_model(
        model_type="qwen3_moe", vocab_size=VOCAB, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, router_aux_loss_coef=0.01, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    save_model_dir(str(path), config, build_tokenizer)


def convert_worker(rank, world, ckpt, out, config_dir):
    from megatron_hapo.models.convert import megatron_to_hf_checkpoint, verify

    megatron_to_hf_checkpoint(ckpt, out, hf_config_dir=config_dir, progress=False)
    return verify(out, ckpt, hf_config_dir=config_dir)


def test_train_command_at_ep2_resumes_and_converts_at_ep1(tmp_path):
    """`megatron-hapo train` (torchrun, 2 ranks, an engine per rank) on Qwen3-MoE at EP 2 for 2
    steps, then resumed for a third with routing replay on: the engine computes what the trainer computes at every step
    (the weight sync gathers the experts and re-prepares them), the MoE metrics are logged. Resuming
    the EP 2 checkpoint at EP 1 is refused with the way out (Megatron's chained optimizer state does
    not reshard across EP 1 ↔ EP > 1); its weights load at EP 1: exported to HF, transformers and
    Megatron at EP 1 give the same logits."""
    import json
    import os
    import subprocess
    import sys

    from megatron_hapo.spawn import free_port

    model = tmp_path / "model"
    moe_model_dir(model)
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    base = [f"model.hf_path={model}", f"train.run_dir={run_dir}", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
            "train.mini_batch_prompts=2", "train.micro_batch_size=4", "train.lr=1e-3", "rollout.dynamic_sampling=false",
            "eval.at_end=false", "log.progress=off", "reward.workers=0", "data.max_prompt_tokens=32",
            "rollout.max_response_tokens=8", "train.save_interval=1"]

    def launch(*extra, ok=True):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "megatron_hapo.train", *base, *extra]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert (res.returncode == 0) == ok, res.stdout[-3000:] + res.stderr[-3000:]
        return res.stdout + res.stderr

    launch("train.steps=2", "parallel.expert_model_parallel_size=2")
    refused = launch("train.steps=3", "parallel.expert_model_parallel_size=1", ok=False)
    assert "does not reshard across that change" in refused and f"model.load={run_dir}/checkpoints/iter_0000002" in refused, refused[-3000:]
    launch("train.steps=3", "parallel.expert_model_parallel_size=2", "rollout.routing_replay=true")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # step 3 replays the engine's experts (recorded per token, moved with the groups between ranks):
    # the engine and the trainer hold the same weights, so the trainer's own routing agrees everywhere
    assert "moe_routing_mismatch" not in rows[1] and rows[2]["moe_routing_mismatch"] == 0.0, rows[2]
    for r in rows:
        assert r["logp_mismatch_at_t_max"] < 1e-4, (r["step"], r["logp_mismatch_at_t_max"])
        assert 0.5 < r["moe_aux_loss"] < 4.0 and "moe_aux_loss_layer1" in r, r
        assert 0 <= r["moe_tokens_per_expert_min"] <= r["moe_tokens_per_expert_max"] and r["moe_load_imbalance"] >= 1.0
    diff = run_ranks(1, convert_worker, str(run_dir / "checkpoints" / "iter_0000003"), str(tmp_path / "exported"), str(model))[0]
    assert diff < 1e-4, diff


def test_moe_configs_that_cannot_run_are_refused_by_name():
    from megatron_hapo.config import Config
    from megatron_hapo.models.hf_config import ModelSpec

    base = {"model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 64,
            "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_experts": 8,
            "num_experts_per_tok": 2}
    del_experts = {k: v for k, v in base.items() if k != "num_experts"}
    assert ModelSpec.from_hf(dict(del_experts, num_local_experts=8)).num_experts == 8  # transformers 5's name
    for bad, match in (({"mlp_only_layers": [0]}, "dense layers between the MoE layers"),
                       ({"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
                       ({"shared_expert_intermediate_size": 64}, "shared experts"),
                       ({"num_experts_per_tok": 9}, "num_experts_per_tok=9 exceeds num_experts=8"),
                       ({"moe_intermediate_size": None}, "config.moe_intermediate_size")):
        with pytest.raises(ValueError, match=match):
            ModelSpec.from_hf(dict(base, **bad))
    dense = ModelSpec.from_hf(dict(base, model_type="qwen3"))
    from megatron_hapo.models.hf_config import check_layout

    with pytest.raises(ValueError, match="the model has no experts"):
        check_layout(dense, 1, 1, ep=2)
    with pytest.raises(ValueError, match="parallel.expert_model_parallel_size=4: world size 2"):
        Config.load(None, ["parallel.expert_model_parallel_size=4"]).validate(2)


def forced_hf_logp(hf, ids, experts):
    """float64 transformers log-probs with each MoE layer's experts forced: experts [B, S, layers, k]
    (the weights: softmax over all experts, kept for the forced ones and renormalized, as HF does
    with norm_topk_prob)."""
    import types

    h = hf.double()
    saved = []
    for layer_index, layer in enumerate(h.model.layers):
        gate = layer.mlp.gate
        saved.append(gate.forward)

        def forward(self, hidden_states, li=layer_index):
            hidden_states = hidden_states.reshape(-1, self.hidden_dim)
            logits = torch.nn.functional.linear(hidden_states, self.weight)
            idx = current[li]
            probs = torch.softmax(logits, dim=-1, dtype=torch.float64)
            top = probs.gather(1, idx)
            top = top / top.sum(-1, keepdim=True)
            return logits, top.to(logits.dtype), idx

        gate.forward = types.MethodType(forward, gate)
    try:
        out = []
        for row in range(ids.shape[0]):
            current = {li: experts[row, :, li].long() for li in range(experts.shape[2])}
            with torch.no_grad():
                lp = torch.log_softmax(h(ids[row:row + 1]).logits[0], -1)
            out.append(lp[:-1].gather(-1, ids[row, 1:, None]).squeeze(-1))
        return torch.stack(out)
    finally:
        for layer, fwd in zip(h.model.layers, saved):
            layer.mlp.gate.forward = fwd


def replay_worker(rank, world, tmp):
    from megatron.core import parallel_state as ps

    from megatron_hapo.algorithms import AlgorithmConfig
    from megatron_hapo.models.hf_config import ModelSpec
    from megatron_hapo.rollout.engine import RolloutEngine, SamplingConfig
    from megatron_hapo.models.mapping import unfuse_hf_experts
    from megatron_hapo.training.parallel import init_model_parallel
    from megatron_hapo.training.policy import MegatronPolicy, PolicyBatch, PolicyConfig

    from .tiny_models import hf_model

    init_model_parallel(1, 1)
    hf = hf_model("qwen3_moe", vocab_size=VOCAB)
    hf.save_pretrained(f"{tmp}/model")
    engine = RolloutEngine(f"{tmp}/model", max_model_len=64, kv_cache_memory_bytes=32 * 2**20, seed=0, record_routing=True)
    spec = ModelSpec.from_hf(hf.config)
    out = {}
    for pack in (0, 64):
        policy = MegatronPolicy(spec, PolicyConfig(routing_replay=True, micro_batch_size=2, lr=3e-2, lr_warmup_steps=0,
                                                   max_tokens_per_micro_batch=pack), AlgorithmConfig.preset("dapo"))
        policy.load_hf_state_dict(hf.state_dict())
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
        res = engine.generate(prompts, 2, SamplingConfig(max_tokens=8), None, list(range(4)))
        rows = [(p, r) for p, rs in zip(prompts, res) for r in rs]
        width = max(len(p) + len(r.token_ids) for p, r in rows) + 1
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        routing = torch.full((len(rows), width, spec.num_layers, spec.moe_top_k), -1, dtype=torch.int16)
        engine_lp = torch.zeros(len(rows), width)
        for i, (p, r) in enumerate(rows):
            seq = p + r.token_ids
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, len(p) - 1:len(seq) - 1] = True
            engine_lp[i, len(p) - 1:len(seq) - 1] = torch.tensor(r.logprobs_t1)
            routing[i, :len(seq) - 1] = torch.from_numpy(r.routing).permute(1, 0, 2)
        m = mask[:, :-1]
        own, _ = policy.compute_logprobs(PolicyBatch(ids, mask))
        replayed, _ = policy.compute_logprobs(PolicyBatch(ids, mask, routing=routing))
        same_routes = policy.take_routing_mismatch()
        # experts forced at random (distinct per token): the replay must be what routes
        rnd = torch.rand(len(rows), width, spec.num_layers, spec.num_experts, generator=g).topk(spec.moe_top_k, -1).indices
        forced, _ = policy.compute_logprobs(PolicyBatch(ids, mask, routing=rnd.to(torch.int16)))
        forced_mismatch = policy.take_routing_mismatch()
        ref = forced_hf_logp(hf, ids, rnd)
        # a stale engine: one large update, no sync: its recorded routing is the old weights'
        old = replayed
        policy.train_step(PolicyBatch(ids, mask, routing=routing, advantages=torch.tensor([1.0, -1.0] * 4), old_logp=old))
        policy.compute_logprobs(PolicyBatch(ids, mask, routing=routing))
        stale = policy.take_routing_mismatch()
        new_own, _ = policy.compute_logprobs(PolicyBatch(ids, mask))
        new_replayed, _ = policy.compute_logprobs(PolicyBatch(ids, mask, routing=routing))
        out[pack] = dict(
            engine_vs_own=(own[:, :-1] - engine_lp[:, :-1]).abs()[m].max().item(),
            engine_vs_replayed=(replayed[:, :-1] - engine_lp[:, :-1]).abs()[m].max().item(),
            same_routes=same_routes, forced_mismatch=forced_mismatch,
            forced_vs_hf=(forced[:, :-1].double() - ref).abs()[m].max().item(),
            forced_vs_own=(forced[:, :-1] - own[:, :-1]).abs()[m].max().item(),
            stale_routing_mismatch=stale,
            stale_logp_own_vs_replayed=(new_own[:, :-1] - new_replayed[:, :-1]).abs()[m].max().item())
        engine.update_weights(list(unfuse_hf_experts(hf.float().state_dict()).items()))  # untouched for the next layout
    engine.close()
    out["multi_turn"] = multi_turn_replay(f"{tmp}/guess")
    ps.destroy_model_parallel()
    return out


def multi_turn_replay(tmp):
    """Routing replay over multi-turn trajectories (the guess environment; random weights, turns ending on
    a digit or EOS): the trajectory's record covers prompt + response − 1 positions, keeps the first
    turn's record as it was, and replays to the trainer's own routes with the engine's log-probs."""
    import numpy as np

    from megatron_hapo.algorithms import AlgorithmConfig
    from megatron_hapo.data import guess
    from megatron_hapo.models.hf_config import ModelSpec
    from megatron_hapo.rollout.engine import RolloutEngine, SamplingConfig
    from megatron_hapo.rollout.env_api import Episodes
    from megatron_hapo.rollout.tools import MultiTurnEngine, TextFormat
    from megatron_hapo.training.policy import MegatronPolicy, PolicyBatch, PolicyConfig

    from .tiny_models import hf_model

    hf = hf_model("qwen3_moe", vocab_size=guess.VOCAB, max_position_embeddings=64)
    hf.save_pretrained(tmp)
    tok = guess.build_tokenizer(tmp)
    base = RolloutEngine(tmp, max_model_len=64, kv_cache_memory_bytes=32 * 2**20, seed=0, record_routing=True)
    engine = MultiTurnEngine(base, TextFormat(tok), None, guess.MAX_TURNS, 4, env=Episodes("guess", {}, 5.0, 2))
    rows = guess.rows("train")[:4]
    prompts = [tok(r["prompt"])["input_ids"] for r in rows]
    stops = (tok.eos_token_id,) + tuple(tok.convert_tokens_to_ids(str(d)) for d in range(10))
    sampling = SamplingConfig(max_tokens=24, stop_token_ids=stops)
    res = [r for rs in engine.generate(prompts, 2, sampling, None, seeds=[5, 6, 7, 8], rows=rows) for r in rs]
    first = [r for rs in base.generate(prompts, 2, sampling, None, seeds=[5, 6, 7, 8]) for r in rs]  # each one's first turn
    policy = MegatronPolicy(ModelSpec.from_hf(hf.config), PolicyConfig(routing_replay=True, micro_batch_size=2, lr=1e-3,
                                                                       lr_warmup_steps=0), AlgorithmConfig.preset("dapo"))
    policy.load_hf_state_dict(hf.state_dict())
    rows_ = [(prompts[k // 2], r) for k, r in enumerate(res)]
    width = max(len(p) + len(r.token_ids) for p, r in rows_) + 1
    layers, _, k = res[0].routing.shape
    ids = torch.zeros(len(res), width, dtype=torch.long)
    mask = torch.zeros(len(res), width, dtype=torch.bool)
    routing = torch.full((len(res), width, layers, k), -1, dtype=torch.int16)
    engine_lp = torch.zeros(len(res), width)
    shapes, kept = [], []
    for i, ((p, r), f) in enumerate(zip(rows_, first)):
        seq = p + r.token_ids
        ids[i, :len(seq)] = torch.tensor(seq)
        model = torch.tensor(r.model_mask)
        mask[i, len(p) - 1:len(seq) - 1] = model
        engine_lp[i, len(p) - 1:len(seq) - 1][model] = torch.tensor(r.logprobs_t1)[model]
        routing[i, :len(seq) - 1] = torch.from_numpy(r.routing).permute(1, 0, 2)
        shapes.append(r.routing.shape[1] == len(seq) - 1)
        kept.append(bool(np.array_equal(r.routing[:, :f.routing.shape[1]], f.routing)) and f.token_ids == r.token_ids[:len(f.token_ids)])
    replayed, _ = policy.compute_logprobs(PolicyBatch(ids, mask, routing=routing))
    mismatch = policy.take_routing_mismatch()
    m = mask[:, :-1]
    engine.close()
    return {"turns": [r.tools[-1] for r in res], "shapes": shapes, "first_turn_kept": kept, "mismatch": mismatch,
            "engine_vs_replayed": (replayed[:, :-1] - engine_lp[:, :-1]).abs()[m].max().item()}


def test_routing_replay_records_the_engines_experts_and_replays_them(tmp_path):
    """Single-turn: the engine's records are the trainer's routes; replayed experts are what routes; a
    stale record differs. Multi-turn (an environment's replies between the model's turns): one record per
    trajectory, each position's as first computed, replayed to the same routes and log-probs."""
    out = run_ranks(1, replay_worker, str(tmp_path), timeout=600)[0]
    mt = out.pop("multi_turn")
    print(f"routing replay, multi-turn: {mt}")
    assert max(mt["turns"]) > 1 and all(mt["shapes"]) and all(mt["first_turn_kept"]), mt
    assert mt["mismatch"] == 0.0 and mt["engine_vs_replayed"] < 1e-4, mt
    for pack, r in out.items():
        print(f"routing replay (pack {pack}): {r}")
        assert r["engine_vs_own"] < 1e-4 and r["engine_vs_replayed"] < 1e-4, r  # the same routes: the same numbers
        assert r["same_routes"] == 0.0, r
        assert r["forced_mismatch"] > 0.5, r  # random experts: the trainer's router would choose otherwise
        assert r["forced_vs_hf"] < 2e-5 and r["forced_vs_own"] > 1e-2, r  # the replayed experts are what routed
        assert r["stale_routing_mismatch"] > 0.0 and r["stale_logp_own_vs_replayed"] > 1e-4, r


def test_routing_records_per_position_with_a_failed_response():
    """The batch's per-position experts: each row's records at its positions, −1 past them and for a
    response the engine could not generate (no records); None when no row has any."""
    import numpy as np

    from megatron_hapo.rollout.collect import RolloutBatch

    def batch(routing):
        return RolloutBatch(prompt_ids=[[1, 2], [3]], response_ids=[[4, 5], []], rewards=torch.zeros(2), group_ids=[0, 0],
                            per_token={}, kept=[], seen=[], gen_batches=1, routing=routing)

    rec = np.array([[[1, 2], [3, 4], [5, 6]]], dtype=np.int16)  # 1 layer, 3 positions fed, top-2
    r = batch([rec, None]).per_position_routing(5)
    assert r.shape == (2, 5, 1, 2) and r.dtype == torch.int16
    assert r[0, :3, 0].tolist() == [[1, 2], [3, 4], [5, 6]] and bool((r[0, 3:] == -1).all()) and bool((r[1] == -1).all())
    assert batch([None, None]).per_position_routing(5) is None and batch(None).per_position_routing(5) is None


def test_routing_replay_refuses_routers_it_cannot_hook():
    """Routers fused with a shared-expert gate (num_experts + 1 outputs), or MoE layers without an
    `mlp.gate` of their own, are refused at engine start with the reason (the real Qwen3-MoE engine
    passes the same check in the routing-replay test above)."""
    from megatron_hapo.rollout.routing import router_problem

    ok = {"model.layers.0.mlp.gate": 8, "model.layers.1.mlp.gate": 8}
    assert router_problem(ok, 2, 8) == ""
    fused = {"model.layers.0.mlp.gate": 9, "model.layers.1.mlp.gate": 9}
    assert "9 outputs for 8 experts" in router_problem(fused, 2, 8)
    assert "2 MoE layers but 1" in router_problem({"model.layers.0.mlp.gate": 8}, 2, 8)
