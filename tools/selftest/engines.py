"""Tier 4, the engines: built after the policy, records vs recomputation, weight sync, sleep/wake, the MoE engine with routing replay and CUDA graphs (the last two in processes of their own)."""
import math
import time

import torch

from megatron_hapo import device as dev

from .core import ENGINES, Skip, check, moe_setup, need_gpu, timed


@check("MoE engine: sync after a step, routing replay of the engine's recorded experts", ENGINES, needs=("vllm",),
       isolated=True)
def c_moe_engine(ctx):
    # in a process of its own: vLLM creates its expert-parallel group only for a MoE model's first engine
    from megatron_hapo.algorithms import logprob_mismatch
    from megatron_hapo.rollout.engine import RolloutEngine, SamplingConfig
    from megatron_hapo.rollout.weight_sync import sync_policy_to_engine
    from megatron_hapo.training.policy import PolicyBatch

    _, policy, ids, mask, path = moe_setup(ctx)
    lp, _ = policy.compute_logprobs(PolicyBatch(ids, mask))
    engine = RolloutEngine(path, max_model_len=64, kv_cache_memory_bytes=32 * 2**20, gpu_memory_utilization=0.15,
                           seed=0, record_routing=True)
    policy.train_step(PolicyBatch(ids, mask, advantages=torch.tensor([1.0, -1.0, 1.0, -1.0]), old_logp=lp))
    sync_policy_to_engine(policy, engine)
    trainer, _ = policy.compute_logprobs(PolicyBatch(ids, mask))
    mm = logprob_mismatch(torch.tensor(engine.score(ids.tolist()), device=trainer.device), trainer[:, :-1], mask[:, :-1])
    res = engine.generate([ids[0, :6].tolist()], 1, SamplingConfig(max_tokens=6), None, [0])[0][0]
    seq = ids[0, :6].tolist() + res.token_ids
    rows = torch.tensor([seq + [0]])
    rmask = torch.zeros_like(rows, dtype=torch.bool)
    rmask[0, 5:len(seq) - 1] = True
    routing = torch.full(rows.shape + (2, 2), -1, dtype=torch.int16)
    routing[0, :len(seq) - 1] = torch.from_numpy(res.routing).permute(1, 0, 2)
    policy.compute_logprobs(PolicyBatch(rows, rmask, routing=routing))
    replay_mismatch = policy.take_routing_mismatch()
    engine.close()
    sync_tol = 1e-2 if dev.is_gpu() else 1e-4
    # the share of (token, layer) pairs whose experts the trainer's router would choose otherwise: 0 on CPU
    # (same fp32 arithmetic); on GPU near-ties may flip under TF32, hence a small share, reported as a figure
    replay_tol = 0.02 if dev.is_gpu() else 0.0
    ok = mm["logp_mismatch_max"] < sync_tol and replay_mismatch is not None and replay_mismatch <= replay_tol
    replay = "no replayed pass" if replay_mismatch is None else f"{replay_mismatch:.3%}"
    return (f"engine vs trainer after a step and sync {mm['logp_mismatch_max']:.1e} (tol {sync_tol:g}); routing replay: "
            f"trainer's own routing differs from the engine's recorded on {replay} of (token, layer) pairs "
            f"(tol {replay_tol:.0%})"), ok


@check("engine built after the policy keeps the rank's current device", ENGINES, needs=("vllm",))
def c_engine_device(ctx):
    from megatron_hapo.rollout.engine import RolloutEngine

    ctx.ensure_model()
    before = torch.cuda.current_device() if dev.is_gpu() else "cpu"
    ctx.engine = RolloutEngine(ctx.model_dir, max_model_len=128, kv_cache_memory_bytes=64 * 2**20, seed=0,
                               dtype="float32", gpu_memory_utilization=0.3, enable_sleep_mode=dev.is_gpu())
    after = torch.cuda.current_device() if dev.is_gpu() else "cpu"
    executor = ctx.engine.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
    return f"executor {executor}; current device {before} → {after}", before == after and executor == "external_launcher"


@check("temperature processor in the engine: records vs recomputation, tokens/s", ENGINES, needs=("vllm",))
def c_temperature(ctx):
    from vllm import SamplingParams, TokensPrompt

    from megatron_hapo import algorithms as A
    from megatron_hapo.rollout.engine import SamplingConfig
    from megatron_hapo.training.policy import PolicyBatch

    if ctx.engine is None:
        raise Skip("skipped: no engine (the engine check failed)")
    policy = ctx.new_policy()  # the engine's weights: the HF folder's
    stats = A.EntropyStats(q=math.log(4.0), sigma=0.5, z_pos=2.0, z_neg=-3.0)
    prompts = [[1] + list(range(5 + i, 15 + i)) for i in range(8)]
    sampling = SamplingConfig(max_tokens=24, adaptive=True, tau=0.3, stop_token_ids=())
    ctx.engine.generate(prompts[:2], 2, sampling, stats, seeds=[0, 1])  # warm-up, not timed
    t0 = time.perf_counter()
    out = ctx.engine.generate(prompts, 4, sampling, stats, seeds=list(range(len(prompts))))
    t_hapo = time.perf_counter() - t0
    responses = [r for group in out for r in group]
    rows = [prompts[r.prompt_index] + r.token_ids for r in responses]
    width = max(map(len, rows)) + 1
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    temps = torch.ones(len(rows), width)
    rec_lp = torch.zeros(len(rows), width)
    rec_h = torch.zeros(len(rows), width)
    for i, (row, r) in enumerate(zip(rows, responses)):
        p = len(prompts[r.prompt_index])
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, p - 1:p - 1 + r.length] = True
        temps[i, p - 1:p - 1 + r.length] = torch.tensor(r.temperatures)
        rec_lp[i, p - 1:p - 1 + r.length] = torch.tensor(r.logprobs)
        rec_h[i, p - 1:p - 1 + r.length] = torch.tensor(r.entropies)
    batch = PolicyBatch(ids, mask)
    lp_t, _ = policy.compute_logprobs(batch, temperature=temps)
    _, h1 = policy.compute_logprobs(batch)
    t_recomputed = A.adaptive_temperature(h1, stats, 1.0, 0.3, "signed")
    d_lp = (lp_t - rec_lp)[mask].abs().max().item()
    d_t = (t_recomputed - temps)[mask].abs().max().item()
    d_h = (h1 - rec_h)[mask].abs().max().item()
    tokens = sum(r.length for r in responses)
    params = [SamplingParams(n=1, temperature=1.0, max_tokens=24, seed=i, detokenize=False) for i in range(len(prompts) * 4)]
    t0 = time.perf_counter()
    plain = ctx.engine.llm.generate([TokensPrompt(prompt_token_ids=prompts[i // 4]) for i in range(len(params))], params,
                                    use_tqdm=False)
    t_plain = time.perf_counter() - t0
    plain_tokens = sum(len(o.outputs[0].token_ids) for o in plain)
    tol = 5e-3 if dev.is_gpu() else 2e-4
    return (f"{tokens} tokens: max|ΔT| {d_t:.1e}, |ΔH| {d_h:.1e}, |Δlog p_T| {d_lp:.1e} (tol {tol:g}); "
            f"{tokens / t_hapo:.0f} tok/s with the processor vs {plain_tokens / t_plain:.0f} for plain vLLM sampling "
            f"(same engine, requests without HAPO arguments)"), max(d_t, d_h, d_lp) < tol


@check("weight sync on the device: no host copy, time vs a device copy, mismatch after sync", ENGINES, needs=("vllm",))
def c_weight_sync(ctx):
    from megatron_hapo.algorithms import logprob_mismatch
    from megatron_hapo.rollout.weight_sync import sync_policy_to_engine

    if ctx.engine is None:
        raise Skip("skipped: no engine (the engine check failed)")
    policy = ctx.policy or ctx.new_policy()
    for seed in (5, 6):
        policy.train_step(ctx.train_batch(policy, seed=seed))
    off_device = [n for n, t in policy.hf_weights() if t.device != dev.device()]
    sync = sync_policy_to_engine(policy, ctx.engine)
    flat = [t for _, t in policy.hf_weights()]
    t_copy = timed(lambda: [t.clone() for t in flat])
    b = ctx.batch(seed=9)
    trainer, _ = policy.compute_logprobs(b)
    eng = torch.tensor(ctx.engine.score(b.input_ids.tolist()), device=trainer.device)
    mm = logprob_mismatch(eng, trainer[:, :-1], b.loss_mask[:, :-1])
    tol = 1e-2 if dev.is_gpu() else 1e-4
    figure = (f"{sync['weight_sync_bytes'] / 2**20:.1f} MiB in {sync['weight_sync_s'] * 1e3:.0f} ms "
              f"({sync['weight_sync_s'] / max(t_copy, 1e-9):.0f}× a device copy); mismatch max {mm['logp_mismatch_max']:.1e} "
              f"(tol {tol:g})")
    if off_device:
        figure += f"; off the device: {off_device[:3]}"
    return figure, not off_device and mm["logp_mismatch_max"] < tol


@check("three sleep/wake cycles without memory growth", ENGINES, needs=("vllm",))
def c_sleep(ctx):
    need_gpu()
    if ctx.engine is None:
        raise Skip("skipped: no engine (the engine check failed)")
    from megatron_hapo.rollout.weight_sync import sync_policy_to_engine

    policy = ctx.policy or ctx.new_policy()
    free = []
    for _ in range(3):
        ctx.engine.sleep()
        dev.free_cached_memory()
        slept = torch.cuda.mem_get_info()[0]
        ctx.engine.wake_up_weights()
        sync_policy_to_engine(policy, ctx.engine)
        ctx.engine.wake_up_kv_cache()
        dev.free_cached_memory()
        free.append((slept, torch.cuda.mem_get_info()[0]))
    growth = (free[0][1] - free[-1][1]) / 2**20
    released = (free[0][0] - free[0][1]) / 2**20
    return f"sleeping frees {released:.0f} MiB; free memory change over 3 cycles {growth:+.0f} MiB (tol 256)", \
        growth < 256 and released > 0


@check("engine with CUDA graphs (enforce_eager=False): records equal the eager engine's, tokens/s", ENGINES,
       needs=("vllm",), isolated=True)
def c_cuda_graphs(ctx):
    # in a process of its own: the graphs engine is a sleep-mode engine, and vLLM's memory pool serves one
    # such engine per process
    from megatron_hapo import algorithms as A
    from megatron_hapo.rollout.engine import RolloutEngine, SamplingConfig

    need_gpu()
    ctx.ensure_model()
    stats = A.EntropyStats(q=math.log(4.0), sigma=0.5, z_pos=2.0, z_neg=-3.0)
    prompts = [[1] + list(range(5 + i, 15 + i)) for i in range(8)]
    sampling = SamplingConfig(max_tokens=32, adaptive=True, tau=0.3, stop_token_ids=())
    common = dict(max_model_len=128, kv_cache_memory_bytes=64 * 2**20, seed=0, dtype="float32", gpu_memory_utilization=0.2)
    eager_engine = RolloutEngine(ctx.model_dir, enforce_eager=True, **common)
    eager_engine.generate(prompts[:2], 2, sampling, stats, seeds=[0, 1])  # warm-up
    eager_t0 = time.perf_counter()
    eager = eager_engine.generate(prompts, 4, sampling, stats, seeds=list(range(8)))
    eager_s = time.perf_counter() - eager_t0
    eager_engine.close()
    graphs = RolloutEngine(ctx.model_dir, enable_sleep_mode=True, enforce_eager=False, **common)
    graphs.generate(prompts[:2], 2, sampling, stats, seeds=[0, 1])  # warm-up (captures)
    t0 = time.perf_counter()
    out = graphs.generate(prompts, 4, sampling, stats, seeds=list(range(8)))
    graphs_s = time.perf_counter() - t0
    graphs.sleep()
    graphs.wake_up_weights()
    graphs.wake_up_kv_cache()
    again = graphs.generate(prompts, 4, sampling, stats, seeds=list(range(8)))  # after a sleep/wake cycle
    graphs.close()
    pairs = [(a, b) for ga, gb in zip(eager, out) for a, b in zip(ga, gb)]
    same_tokens = sum(a.token_ids == b.token_ids for a, b in pairs) / len(pairs)
    d_lp = max((abs(x - y) for a, b in pairs if a.token_ids == b.token_ids for x, y in zip(a.logprobs, b.logprobs)),
               default=0.0)
    stable = all(a.token_ids == b.token_ids for ga, gb in zip(out, again) for a, b in zip(ga, gb))
    tokens = sum(r.length for g in out for r in g)
    return (f"identical responses {same_tokens:.0%}, max|Δlog p| on them {d_lp:.1e}; same after sleep/wake: {stable}; "
            f"{tokens / graphs_s:.0f} tok/s with graphs vs {tokens / eager_s:.0f} eager"), \
        same_tokens >= 0.9 and d_lp < 5e-3 and stable
