"""Tier 2, Transformer Engine: HF weights into the TE spec vs transformers and the local spec; a local-spec checkpoint into the TE model."""
import os

import torch

from megatron_hapo import device as dev

from .core import check, installed, need_gpu, hf_gpt_model, spec_logits, TE


@check("HF weights → Megatron (TE spec): logits vs transformers and vs the local spec", TE)
def c_hf_logits(ctx):
    import transformers

    ctx.ensure_model()
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(ctx.model_dir, dtype=torch.float32).to(dev.device()).eval()
    local, ids = spec_logits(ctx, "local")
    with torch.no_grad():
        ref = ref_model(ids).logits.float()
    d_local = (local - ref).abs().max().item()
    # fp32 everywhere; on GPU matmuls may run in TF32 (TE), hence the looser bound there
    tol = 2e-2 if dev.is_gpu() else 1e-4
    figure = f"local spec vs transformers max|Δlogit| {d_local:.2e} (tol {tol:g})"
    ok = d_local < tol
    if not dev.is_gpu():
        return figure + "; TE spec skipped: no GPU", ok
    if not installed("transformer_engine"):
        return figure + "; TE spec skipped: not installed", ok
    te, _ = spec_logits(ctx, "te")
    d_te, d_te_local = (te - ref).abs().max().item(), (te - local).abs().max().item()
    te_bf16, _ = spec_logits(ctx, "te", torch.bfloat16)
    rel_bf16 = ((te_bf16 - ref).abs().max() / ref.abs().max()).item()
    figure += f"; TE vs transformers {d_te:.2e}, TE vs local {d_te_local:.2e}; TE bf16 rel {rel_bf16:.2e} (tol 5e-2)"
    return figure, ok and d_te < tol and d_te_local < tol and rel_bf16 < 5e-2


@check("a local-spec (CPU-converted) checkpoint loads into the TE model", TE, needs=("transformer_engine",))
def c_local_into_te(ctx):
    need_gpu()
    from megatron.core import dist_checkpointing

    from megatron_hapo.training.checkpoint import load_model_checkpoint

    model = hf_gpt_model(ctx, "local")
    path = os.path.join(ctx.work, "local_ckpt")
    os.makedirs(path)
    with dev.megatron_scope():
        dist_checkpointing.save({"model": model.sharded_state_dict()}, path)
    te_policy = ctx.new_policy(layer_spec="te")
    with torch.no_grad():
        for c in te_policy.chunks:
            for p in c.module.parameters():
                p.zero_()
    load_model_checkpoint(path, te_policy)
    restored = te_policy.hf_state_dict()
    d = max((restored[k].float() - ctx.hf[k].float()).abs().max().item() for k in restored)
    return f"TE policy from a local-spec checkpoint: max|Δw| vs HF {d:.2e}", d == 0.0
