"""A multi-node launch on one machine: two `torchrun --nnodes 2` launchers (c10d rendezvous, 2 ranks
each, as two nodes of a cluster job would start) run two HAPO steps of the trainer with TP 2 inside a
"node" and DP 2 across the two. Cost: about two minutes (4 ranks, an engine each)."""
import json
import os
import subprocess
import sys

from megatron_hapo.spawn import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_launchers_as_two_nodes(tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    port = free_port()
    job = [f"train.run_dir={run_dir}", "train.steps=2", "parallel.tensor_model_parallel_size=2",
           "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "train.mini_batch_prompts=4",
           "train.micro_batch_size=4", "rollout.max_response_tokens=4", "rollout.dynamic_sampling=false",
           "eval.at_end=false", "log.progress=off", "log.tensorboard=false", "reward.workers=0",
           f"rollout.kv_cache_memory_bytes={32 * 2**20}"]
    launchers = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
               "--max-restarts", "0", "-m", "megatron_hapo.train", *job]
        log = open(tmp_path / f"node{node}.log", "w")
        launchers.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    codes = []
    for proc, log in launchers:
        try:
            codes.append(proc.wait(timeout=600))
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    logs = [(tmp_path / f"node{n}.log").read_text() for n in range(2)]
    assert codes == [0, 0], "\n\n".join(x[-3000:] for x in logs)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] == r["loss"] and abs(r["loss"]) < 10 for r in rows), rows  # finite (an untrained model:
    # its groups may all be wrong, so the loss may be 0)
    assert (run_dir / "checkpoints" / "iter_0000002" / "COMPLETE").exists()
    saved = (run_dir / "config.yaml").read_text()
    assert "tensor_model_parallel_size: 2" in saved
