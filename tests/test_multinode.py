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


def _job_pids(job_id: str, rank: str, parent: int):
    """The pids of the job's rank `rank` that `parent` (the torchrun agent) started, from /proc."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if env.get(b"HAPO_TEST_JOB") == job_id.encode() and env.get(b"RANK") == rank.encode() and ppid == parent:
            out.append(int(pid))
    return out


def test_a_killed_engine_rank_restarts_the_job_and_it_resumes(tmp_path):
    """Self-healing: `torchrun --max-restarts 1`, separate placement (rank 0 trains, rank 1 hosts the
    engine), a checkpoint every step. The engine rank is SIGKILLed during step 3; torchrun restarts the
    job, which resumes from step 2's checkpoint with no action and finishes: every step once, each
    step's data positions after the last (consumed once), exit 0."""
    import signal
    import time

    run_dir = tmp_path / "run"
    phases = tmp_path / "phases.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HAPO_TEST_JOB=str(tmp_path), MEGATRON_HAPO_PHASE_FILE=str(phases))
    job = [f"train.run_dir={run_dir}", "train.steps=4", "train.save_interval=1", "rollout.placement=separate",
           "rollout.engine_ranks=1", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=4",
           "train.mini_batch_prompts=4", "train.micro_batch_size=4", "rollout.max_response_tokens=4",
           "rollout.dynamic_sampling=false", "eval.at_end=false", "log.progress=off", "log.tensorboard=false",
           "reward.workers=0", f"rollout.kv_cache_memory_bytes={32 * 2**20}", "rollout.fused_processor=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
           "--monitor-interval", "1", "-m", "megatron_hapo.train", *job]
    with open(tmp_path / "job.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline, killed = time.time() + 400, []
            while time.time() < deadline and proc.poll() is None and not killed:
                if phases.exists() and "3 rollout" in phases.read_text().split("\n"):
                    killed = _job_pids(str(tmp_path), "1", proc.pid)
                    for pid in killed:
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.2)
            code = proc.wait(timeout=500)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = (tmp_path / "job.log").read_text()
    assert killed and code == 0, text[-4000:]
    assert "resumed from" in text and "iter_0000002" in text, text[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["data_position"] for r in rows] == [4, 8, 12, 16]  # each step's four prompts, none twice
    assert (run_dir / "checkpoints" / "iter_0000004" / "COMPLETE").exists()
