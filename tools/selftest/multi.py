"""Tier 7, with 2+ GPUs: parallel layouts against one GPU, and separate placement's NCCL weight transfer."""
import os
import subprocess
import sys
import json

import torch

from megatron_hapo import device as dev

from .core import ROOT, check, need_gpu, MULTI


@check("2 GPUs: TP 2, DP 2 and PP 2 vs TP 1; engines at inference TP 2 and two at TP 1", MULTI, needs=("vllm",))
def c_multi(ctx):
    if not ctx.multi_on_cpu:
        need_gpu(2)
    from megatron_hapo.training.policy import PolicyBatch

    ref_policy = ctx.new_policy(algo="dapo")
    b = ctx.batch(seed=11)
    logp, _ = ref_policy.compute_logprobs(b)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], device=dev.device())
    m = ref_policy.train_step(PolicyBatch(b.input_ids, b.loss_mask, advantages=adv, old_logp=logp))
    torch.save({"input_ids": b.input_ids.cpu(), "loss_mask": b.loss_mask.cpu(), "advantages": adv.cpu(), "logp": logp.cpu(),
                "after": ref_policy.hf_state_dict(), "loss": m["loss"], "grad_norm": m["grad_norm"]},
               os.path.join(ctx.work, "reference.pt"))
    figures, ok = [], True
    for extra in ([], ["--engines-tp1"]):
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              os.path.join(ROOT, "tools", "gpu_selftest_multi.py"), ctx.work] + extra,
                             capture_output=True, text=True, cwd=ROOT, timeout=600)
        lines = [x for x in res.stdout.splitlines() if x.startswith("MULTI ")]
        if res.returncode or not lines:
            return f"{' '.join(extra) or 'layouts'} exited {res.returncode}: {(res.stderr.strip().splitlines() or [''])[-1][:200]}", False
        result = json.loads(lines[-1][6:])
        figures.append(result["figure"])
        ok = ok and result["ok"]
    return ("" if dev.is_gpu() else "(CPU, gloo) ") + "; ".join(figures), ok


@check("2 GPUs: separate placement (trainer on one GPU, engine rank on the other): NCCL weight transfer, GB/s vs a "
       "device-to-device copy", MULTI)
def c_bridge(ctx):
    if not ctx.multi_on_cpu:
        need_gpu(2)
    ctx.ensure_model()
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          os.path.join(ROOT, "tools", "gpu_selftest_bridge.py"), ctx.work, "1024" if dev.is_gpu() else "64"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    lines = [x for x in res.stdout.splitlines() if x.startswith("BRIDGE ")]
    if res.returncode or not lines:
        errors = [x for x in res.stderr.splitlines() if "Error" in x] or res.stderr.strip().splitlines() or [""]
        return f"exited {res.returncode}: {errors[-1][:200]}", False
    result = json.loads(lines[-1][7:])
    return ("" if dev.is_gpu() else "(CPU, gloo) ") + result["figure"], result["ok"]
