"""A deterministic little training job for checkpoint tests: batch k depends only on k.

    python -m tests.ckpt_job ROOT STEPS SAVE_AT [--hold]    (one process; --hold: sleep after saving)
"""
import json
import os
import sys
import time

import torch


def batch_for(step):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 200, (4, 12), generator=g)
    mask = torch.zeros(4, 12, dtype=torch.bool)
    mask[:, 3:11] = True
    adv = torch.randn(4, generator=g)
    return ids, mask, adv


def build(tp=1, pp=1, dist_opt=False):
    from megatron_hapo.algorithms import AlgorithmConfig
    from megatron_hapo.models.hf_config import ModelSpec
    from megatron_hapo.training.parallel import init_model_parallel
    from megatron_hapo.training.policy import MegatronPolicy, PolicyConfig

    from tests.tiny_models import hf_model

    init_model_parallel(tp, pp)
    hf = hf_model("qwen2")
    policy = MegatronPolicy(ModelSpec.from_hf(hf.config),
                            PolicyConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, micro_batch_size=2,
                                         lr=1e-3, adam_eps=1e-2, lr_warmup_steps=3, use_distributed_optimizer=dist_opt),
                            AlgorithmConfig.preset("dapo"))
    policy.load_hf_state_dict(hf.state_dict())
    return policy


def run(policy, root, start, stop, save_at=None, keep_last=None):
    from megatron_hapo.training.checkpoint import save_checkpoint
    from megatron_hapo.training.policy import PolicyBatch

    metrics = []
    for step in range(start, stop):
        ids, mask, adv = batch_for(step)
        old, _ = policy.compute_logprobs(PolicyBatch(ids, mask))
        m = policy.train_step(PolicyBatch(ids, mask, advantages=adv, old_logp=old))
        metrics.append({k: m[k] for k in ("loss", "grad_norm", "lr")})
        if save_at is not None and step + 1 in save_at:
            save_checkpoint(root, step + 1, policy, {"data_position": step + 1, "entropy_stats": None}, keep_last=keep_last)
    return metrics


def worker(rank, world, tp, pp, root, start, stop, resume):
    from megatron_hapo.training.checkpoint import find_latest, load_checkpoint

    policy = build(tp, pp)
    state = None
    if resume:
        state = load_checkpoint(find_latest(root), policy)
        start = state["data_position"]
    metrics = run(policy, root, start, stop)
    return {"metrics": metrics, "weights": policy.hf_state_dict(), "state": state}


def dist_opt_worker(rank, world, root, stop, resume, save_at):
    """DP = world with the distributed optimizer: a straight run saving at `save_at`, or a resume from
    the latest checkpoint in `root`."""
    from megatron_hapo.training.checkpoint import find_latest, load_checkpoint

    policy = build(dist_opt=True)
    start, state = 0, None
    if resume:
        state = load_checkpoint(find_latest(root), policy)
        start = state["data_position"]
    metrics = run(policy, root, start, stop, save_at=save_at)
    return {"metrics": metrics, "weights": policy.hf_state_dict(), "state": state}


if __name__ == "__main__":
    torch.set_num_threads(1)  # as run_ranks' workers: the straight runs it is compared with bit for bit


if __name__ == "__main__" and sys.argv[1] != "disk-full":
    root, steps, save_at = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",") if x]
    policy = build()
    metrics = run(policy, root, 0, steps, save_at)
    with open(os.path.join(root, "job_metrics.json"), "w") as f:
        json.dump(metrics, f)
    if "--hold" in sys.argv:
        open(os.path.join(root, "HELD"), "w").close()
        time.sleep(600)  # the test kills us here


def disk_full(root):
    """Inside a user + mount namespace whose `root` is a tmpfs with room for one checkpoint: the
    second save fails; then the same with the tmpfs read-only. Prints what it saw as JSON."""
    import subprocess

    from megatron_hapo.training.checkpoint import CheckpointWriteError, complete_checkpoints, find_latest, load_checkpoint

    policy = build()
    run(policy, root, 0, 1, save_at=[1])
    after_one = {k: v.clone() for k, v in policy.hf_state_dict().items()}
    seen = {}
    for case in ("full", "read_only"):
        if case == "read_only":
            subprocess.run(["mount", "-o", "remount,ro", root], check=True)
        try:
            run(policy, root, 1, 2, save_at=[2])
            seen[case] = "saved"
        except CheckpointWriteError as exc:
            seen[case] = str(exc)
        seen[case + "_complete"] = [s for s, _ in complete_checkpoints(root)]
        seen[case + "_left"] = sorted(os.listdir(root))
        seen[case + "_latest"] = open(os.path.join(root, "latest")).read().strip()
        load_checkpoint(find_latest(root), policy)  # the kept checkpoint loads: back at step 1
        seen[case + "_loads"] = all(torch.equal(v, after_one[k]) for k, v in policy.hf_state_dict().items())
    print("RESULT " + json.dumps(seen), flush=True)


if __name__ == "__main__" and sys.argv[1] == "disk-full":
    disk_full(sys.argv[2])
    sys.exit(0)
