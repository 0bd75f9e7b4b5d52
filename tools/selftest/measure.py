"""Tier 6, measurements: the temperature kernel and eager path in GB/s, the update's MFU on a 0.5 B model."""
import math
import time

import torch

from megatron_hapo import device as dev

from .core import MEASURE, check, need_compiler, need_gpu, processor, sync_device, timed


@check("temperature kernel (Triton on GPU, C++ on CPU) and eager path vs float64; GB/s vs a device copy", MEASURE)
def c_temperature_kernel(ctx):
    from megatron_hapo import algorithms as A
    from megatron_hapo.rollout import temperature_processor as tp

    need_compiler()
    device = dev.device()
    rows, vocab = (64, 151_936) if dev.is_gpu() else (16, 32_768)
    stats = A.EntropyStats(q=math.log(4.0), sigma=0.5, z_pos=2.0, z_neg=-3.0)
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(rows, vocab, generator=g)).to(device)
    logits[:, -50:] = float("-inf")
    x64 = logits.double()
    logp = torch.log_softmax(x64, -1)
    ent = -(torch.where(torch.isfinite(logp), logp.exp() * logp, 0.0)).sum(-1)
    temp = A.adaptive_temperature(ent, stats, 1.0, 0.2, "signed").double()
    ref = torch.stack([temp, ent, torch.logsumexp(x64, -1), torch.logsumexp(x64 / temp[:, None], -1)], 1).cpu()
    saved, figures, ok = tp._FUSED["wanted"], [], True
    nbytes = logits.numel() * logits.element_size()
    try:
        for path in ("fused", "eager"):
            tp.use_fused(path == "fused")
            # one request per row, each at its first response position
            proc = processor(tp, device, [(f"k-{path}-{i}", stats, 1.0, 0.2, "signed", []) for i in range(rows)])
            proc.apply(logits.clone())  # warm-up (compiles the fused kernel)
            tp.RECORDER.pop({f"k-{path}-{i}" for i in range(rows)})
            work = iter([logits.clone() for _ in range(5)])
            t = timed(lambda: proc.apply(next(work)), reps=5)
            rec = tp.RECORDER.pop({f"k-{path}-{i}" for i in range(rows)})
            got = torch.tensor([rec[f"k-{path}-{i}"][0] for i in range(rows)], dtype=torch.float64)
            err = ((got - ref).abs() / ref.abs().clamp_min(1.0)).max().item()
            ok = ok and err < 1e-4
            if path == "fused":
                ok = ok and tp.fused_failure() is None
            figures.append(f"{path} {t * 1e3:.2f} ms ({4 * nbytes / t / 1e9:.0f} GB/s at 3 reads + 1 write), "
                           f"max rel err {err:.1e}")
    finally:
        tp.use_fused(saved)
    t_copy = timed(logits.clone, reps=5)
    return (f"{rows} × {vocab:,} fp32 logits: " + "; ".join(figures) + f"; device copy {t_copy * 1e3:.2f} ms "
            f"({2 * nbytes / t_copy / 1e9:.0f} GB/s); tol 1e-4"), ok


H100_H200_BF16_DENSE = 989.4e12  # FLOP/s, the SXM parts' dense bf16 peak


@check("update MFU: a 0.5 B Qwen2-shaped model built in code, bf16, 4096-token sequences", MEASURE)
def c_mfu(ctx):
    """Model FLOPs utilisation of the policy update (forward + backward + optimizer step) on a model of
    Qwen2.5-0.5B's shape (random weights, the HAPO loss, distributed optimizer), 8 sequences of 4096."""
    need_gpu()
    from megatron_hapo.algorithms import AlgorithmConfig
    from megatron_hapo.models.hf_config import ModelSpec
    from megatron_hapo.training.policy import MegatronPolicy, PolicyBatch, PolicyConfig
    import transformers

    cfg = transformers.AutoConfig.for_model(
        model_type="qwen2", vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=True)
    spec = ModelSpec.from_hf(cfg)
    rows, seq, mbs = 8, 4096, 1
    policy = MegatronPolicy(spec, PolicyConfig(micro_batch_size=mbs, dtype="bfloat16", lr=1e-5, lr_warmup_steps=0,
                                               use_distributed_optimizer=True, layer_spec=ctx.layer_spec),
                            AlgorithmConfig.preset("hapo"))
    params = sum(p.numel() for c in policy.chunks for p in c.module.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151_000, (rows, seq), generator=g).to(dev.device())
    mask = torch.ones(rows, seq, dtype=torch.bool, device=dev.device())
    mask[:, :256] = False  # a prompt
    mask[:, -1] = False
    old, ent = policy.compute_logprobs(PolicyBatch(ids, mask))
    batch = PolicyBatch(ids, mask, advantages=torch.linspace(-1, 1, rows, device=dev.device()), old_logp=old,
                        h_hat=torch.zeros_like(ent))
    policy.train_step(batch)  # warm-up
    sync_device()
    steps = 3
    t0 = time.perf_counter()
    for _ in range(steps):
        m = policy.train_step(batch)
    sync_device()
    t = (time.perf_counter() - t0) / steps
    tokens = rows * seq
    h, L, v = spec.hidden_size, spec.num_layers, spec.vocab_size
    dense = params - v * h  # the matmul parameters of the layers; the tied output layer counted once below
    flops = 6 * tokens * (dense + v * h) + 6 * tokens * L * seq * h  # + causal attention: 12·L·s·h per token / 2
    name = torch.cuda.get_device_name()
    peak = H100_H200_BF16_DENSE if ("H100" in name or "H200" in name) else None
    mfu = f"MFU {flops / t / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else "no peak known for this GPU"
    return (f"{params / 1e9:.2f} B parameters, {rows} × {seq} tokens, {ctx.layer_spec} spec: {t:.3f} s a step, "
            f"{tokens / t:,.0f} tokens/s, {flops / t / 1e12:.0f} TFLOP/s, {mfu}; loss {m['loss']:.4f}"), \
        math.isfinite(m["loss"]) and not m["skipped"]
