"""Tier 3, the training path (neither vLLM nor TE needed): placement, vocab-parallel log-probs, a bf16 step, packing, save/resume, MoE, the temperature processor without syncs, the weights walk."""
import math
import os

import torch

from megatron_hapo import device as dev

from .core import TRAINING, MOE_TOL, check, max_diff, moe_setup, need_compiler, policy_params, processor, timed


@check("parameters, gradients and batches on the rank's device", TRAINING)
def c_placement(ctx):
    policy = ctx.policy = ctx.new_policy()
    want = dev.device()
    tb = ctx.train_batch(policy)
    seen = {}
    original = policy.batcher.split

    def spy(batch):  # what the micro-batches hold, as the schedule receives them
        out = original(batch)
        seen.update({k: v.device for k, v in out[0].items() if isinstance(v, torch.Tensor)})
        seen["input_ids"] = out[0]["batch"].input_ids.device
        return out

    policy.batcher.split = spy
    try:
        m = policy.train_step(tb)
    finally:
        policy.batcher.split = original
    wrong = [n for c in policy.chunks for n, p in c.module.named_parameters() if p.device != want]
    wrong += [f"grad {n}" for c in policy.chunks for n, p in c.module.named_parameters()
              if getattr(p, "main_grad", None) is not None and p.main_grad.device != want]
    # `rows` (which rows of the batch a micro-batch holds) is created on the host on purpose: it indexes
    # host-side bookkeeping and goes to the device only where a device tensor is indexed with it
    wrong += [f"batch {k}" for k, d in seen.items() if d != want and k != "rows"]
    figure = f"{sum(1 for c in policy.chunks for _ in c.module.parameters())} parameters, batch on {want}; loss {m['loss']:.4f}"
    if wrong:
        figure += f"; elsewhere: {wrong[:4]}"
    return figure, not wrong and math.isfinite(m["loss"])


@check("vocab-parallel log-probs/entropy at V = 151,936 vs float64; GB/s", TRAINING)
def c_vocab(ctx):
    from megatron_hapo.parallel import vocab_parallel_logprobs_and_entropy

    vocab, tokens = 151_936, (4096 if dev.is_gpu() else 64)
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if dev.is_gpu() else torch.float32
    logits = (3 * torch.randn(tokens, vocab, generator=g)).to(dev.device(), dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(dev.device())
    temps = (0.8 + 0.4 * torch.rand(tokens, generator=g)).to(dev.device())
    logp, ent = vocab_parallel_logprobs_and_entropy(logits, labels, temps, chunk_size=1024)
    ref = torch.log_softmax(logits.double() / temps.double()[:, None], -1)
    ref_logp = ref.gather(-1, labels[:, None]).squeeze(-1)
    ref_ent = -(ref.exp() * ref).sum(-1)
    d = max((logp.double() - ref_logp).abs().max().item(), (ent.double() - ref_ent).abs().max().item())
    t_ours = timed(lambda: vocab_parallel_logprobs_and_entropy(logits, labels, temps, chunk_size=1024), reps=5)
    t_copy = timed(logits.clone, reps=5)
    nbytes = logits.numel() * logits.element_size()
    return (f"{tokens} tokens {str(dtype)[6:]}: max|Δ| {d:.2e} vs fp64 (tol 1e-3); {t_ours * 1e3:.1f} ms = "
            f"{t_ours / t_copy:.1f}× a device copy of the {nbytes / 2**20:.0f} MiB logits; reads the logits at "
            f"{nbytes / t_ours / 1e9:.0f} GB/s (copy: {2 * nbytes / t_copy / 1e9:.0f} GB/s read + write)"), d < 1e-3


@check("HAPO train step, bf16, distributed optimizer", TRAINING)
def c_train_bf16(ctx):
    dtype = "bfloat16" if dev.is_gpu() else "float32"
    policy = ctx.new_policy(dtype=dtype, distributed_optimizer=True)
    before = policy_params(policy)
    m = policy.train_step(ctx.train_batch(policy))
    moved = max_diff(policy_params(policy), before)
    ok = math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and not m["skipped"] and moved > 0
    note = "" if dev.is_gpu() else " (fp32 on CPU)"
    return f"{dtype}{note}: loss {m['loss']:.4f}, grad norm {m['grad_norm']:.3f}, max|Δw| {moved:.2e}", ok


@check("packed micro-batches (THD on the TE spec) vs padded rows: log-probs and one update", TRAINING)
def c_packed(ctx):
    from megatron_hapo.training.policy import PolicyBatch

    ctx.ensure_model()
    b = ctx.batch(rows=4, width=40, seed=4)
    mask = b.loss_mask.clone()
    for i, n in enumerate((40, 13, 27, 9)):  # lengths that differ, so the padded rows waste tokens
        mask[i, n - 1:] = False
    b = PolicyBatch(b.input_ids, mask)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], device=dev.device())
    out = {}
    for name, budget in (("padded", 0), ("packed", 48)):
        policy = ctx.new_policy(algo="dapo", max_tokens=budget)
        old, _ = policy.compute_logprobs(b)
        m = policy.train_step(PolicyBatch(b.input_ids, mask, advantages=adv, old_logp=old))
        out[name] = (old, m, policy_params(policy), policy.take_token_counts())
    d_logp = (out["packed"][0] - out["padded"][0]).abs().max().item()
    d_w = max_diff(out["packed"][2], out["padded"][2])
    d_g = abs(out["packed"][1]["grad_norm"] - out["padded"][1]["grad_norm"])
    pad = {k: v[3]["tokens_computed"] / v[3]["tokens_real"] for k, v in out.items()}
    tol = 5e-3 if dev.is_gpu() else 1e-5  # TE's varlen kernels (TF32 on GPU) vs its padded path
    spec = "TE spec, THD" if ctx.layer_spec == "te" else "local spec, block-diagonal mask"  # the spec built
    return (f"{spec}: max|Δlogp| {d_logp:.2e}, max|Δw| after a step {d_w:.2e}, |Δ grad norm| {d_g:.1e} (tol {tol:g}); "
            f"padding factor {pad['padded']:.2f} → {pad['packed']:.2f}"), d_logp < tol and d_w < tol and d_g < tol * 10


@check("save → resume → one step equals a straight run", TRAINING)
def c_resume(ctx):
    from megatron_hapo.training.checkpoint import load_checkpoint, save_checkpoint

    root = os.path.join(ctx.work, "ckpt")
    a = ctx.new_policy(distributed_optimizer=True)
    a.train_step(ctx.train_batch(a, seed=1))
    save_checkpoint(root, 1, a)
    m_a = a.train_step(ctx.train_batch(a, seed=2))
    straight = policy_params(a)
    b = ctx.new_policy(distributed_optimizer=True)
    load_checkpoint(os.path.join(root, "iter_0000001"), b)
    m_b = b.train_step(ctx.train_batch(b, seed=2))
    d = max_diff(policy_params(b), straight)
    d_g = abs(m_b["grad_norm"] - m_a["grad_norm"])
    tol = 1e-6 if dev.is_gpu() else 0.0  # bit-exact on CPU; GPU kernels may reorder sums
    return f"max|Δw| resumed vs straight {d:.2e}, |Δ grad norm| {d_g:.1e} (tol {tol:g})", d <= tol and d_g <= tol * 100


@check("MoE (tiny Qwen3-MoE, EP 1; TE grouped experts with the TE spec): log-probs vs transformers, weights round "
       "trip, a step", TRAINING)
def c_moe(ctx):
    from megatron_hapo.models.mapping import unfuse_hf_experts
    from megatron_hapo.training.policy import PolicyBatch

    hf, policy, ids, mask, _ = moe_setup(ctx)
    want = unfuse_hf_experts(hf.state_dict())
    names = [n for n in policy.chunks[0].module.state_dict() if ".experts." in n and not n.endswith("_extra_state")]
    back = policy.hf_state_dict()
    round_trip = set(back) == set(want) and all(torch.equal(back[k].cpu(), want[k]) for k in want)
    lp, _ = policy.compute_logprobs(PolicyBatch(ids, mask))
    with torch.no_grad():
        ref = torch.log_softmax(hf.double()(ids).logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    hf_err = (lp[:, :-1].cpu().double() - ref).abs()[mask[:, :-1]].max().item()
    m = policy.train_step(PolicyBatch(ids, mask, advantages=torch.tensor([1.0, -1.0, 1.0, -1.0]), old_logp=lp))
    ok = hf_err < MOE_TOL and round_trip and math.isfinite(m["loss"]) and not m["skipped"]
    return (f"{policy.layer_spec} spec, expert names {names[:1]}: max|Δ log p| vs transformers float64 {hf_err:.1e} "
            f"(tol {MOE_TOL:g}); round trip exact: {round_trip}; step loss {m['loss']:.4f}, grad norm {m['grad_norm']:.3f}"), ok


@check("temperature processor: no device-to-host sync in a decoding step (fused kernel and eager path)", TRAINING)
def c_processor_sync(ctx):
    from megatron_hapo import algorithms as A
    from megatron_hapo.rollout import temperature_processor as tp

    need_compiler()
    device = dev.device()
    stats = A.EntropyStats(q=math.log(4.0), sigma=0.5, z_pos=2.0, z_neg=-3.0)
    vocab = 151936 if dev.is_gpu() else 32768  # Qwen's vocabulary on GPU; smaller on CPU (the suite runs this)
    logits = torch.randn(8, vocab, device=device)
    logits[:, -100:] = float("-inf")  # masked tokens: the −inf path too
    saved, results = tp._FUSED["wanted"], {}
    try:
        for path in ("fused", "eager"):
            tp.use_fused(path == "fused")
            # two groups of settings: the per-group path as well
            proc = processor(tp, device, [(f"sync-{path}-{i}", stats, 1.0, 0.1 if i % 2 else 0.2, "signed", [0] * i)
                                           for i in range(6)])
            proc.apply(logits.clone())  # warm-up (the fused kernel compiles here)
            if dev.is_gpu():
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")  # any implicit device-to-host sync raises
            try:
                out = proc.apply(logits.clone())
            finally:
                if dev.is_gpu():
                    torch.cuda.set_sync_debug_mode("default")
            rec = tp.RECORDER.pop({f"sync-{path}-{i}" for i in range(6)})
            values = torch.tensor([rec[f"sync-{path}-{i}"][i] for i in range(6)], dtype=torch.float64)
            results[path] = (out, values)
    finally:
        tp.use_fused(saved)
    finite = all(bool(torch.isfinite(out[:6, :-100]).all()) and bool(torch.isfinite(v).all()) for out, v in results.values())
    diff = (results["fused"][1] - results["eager"][1]).abs().max().item()
    built = tp.fused_failure() is None and device.type in tp._FUSED["proven"]
    mode = "under torch.cuda sync debug mode 'error'" if dev.is_gpu() else "on CPU (no device to wait for)"
    return (f"6 rows × {vocab:,} logits, −inf tail: no sync {mode}, both paths; records finite: {finite}; fused kernel "
            f"built on {device.type}: {built} ({tp.fused_failure() or 'ok'}); fused vs eager records max |Δ| {diff:.1e} "
            f"(tol 1e-3)"), finite and built and diff < 1e-3


@check("weights walk (hf_weights, what sync and export stream) stays on the device; GB/s vs a device copy", TRAINING)
def c_weights_walk(ctx):
    policy = ctx.new_policy()  # the HF folder's weights, untrained: the walk must give them back exactly
    walked = []
    t_walk = timed(lambda: walked.extend(policy.hf_weights()))
    off_device = [n for n, t in walked if t.device != dev.device()]
    nbytes = sum(t.numel() * t.element_size() for _, t in walked)
    t_copy = timed(lambda: [t.clone() for _, t in walked])
    exact = all(torch.equal(t.cpu(), ctx.hf[n]) for n, t in walked if n in ctx.hf) and {n for n, _ in walked} <= set(ctx.hf)
    figure = (f"{len(walked)} tensors, {nbytes / 2**20:.1f} MiB on {dev.device()}: walk {t_walk * 1e3:.1f} ms "
              f"({nbytes / t_walk / 1e9:.2f} GB/s) vs a device copy {t_copy * 1e3:.2f} ms; equal to the HF weights "
              f"loaded: {exact}")
    if off_device:
        figure += f"; off the device: {off_device[:3]}"
    return figure, not off_device and exact
