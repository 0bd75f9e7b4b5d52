"""Tier 5, the trainer: two steps, then a resume for a third."""
import os
import subprocess
import sys
import time
import json

from .core import ROOT, check, TRAINER


@check("trainer: 2 steps, then resume for a third", TRAINER, needs=("vllm",))
def c_trainer(ctx):
    run_dir = os.path.join(ctx.work, "run")
    base = [sys.executable, "-m", "megatron_hapo.train", f"train.run_dir={run_dir}", "log.progress=off",
            "rollout.max_response_tokens=6", "eval.at_end=false", "reward.workers=0", "rollout.prompts_per_step=4",
            "train.mini_batch_prompts=4", "train.micro_batch_size=4", "rollout.gpu_memory_utilization=0.2",
            "rollout.dynamic_sampling=false"]  # an untrained model: groups may be all wrong
    env = dict(os.environ, LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"))
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("MASTER_PORT", None)
    t0 = time.perf_counter()
    first = subprocess.run(base + ["train.steps=2"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    second = subprocess.run(base + ["train.steps=3"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    for name, res in (("first", first), ("resume", second)):
        if res.returncode:
            return f"{name} run exited {res.returncode}: {res.stderr.strip().splitlines()[-1:]}", False
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if line.strip()]
    ok = "resumed from" in second.stdout and steps == [1, 2, 3]
    return f"steps logged {steps}, resumed: {'resumed from' in second.stdout}, {time.perf_counter() - t0:.0f} s", ok
