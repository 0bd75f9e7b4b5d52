"""Training checkpoints: exact resume after a SIGKILL, resume at another layout, atomic saves."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

from .distributed import error_text, run_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]
N = 4


def spawn_job(root, steps, save_at, hold=False, env=None):
    args = [sys.executable, "-m", "tests.ckpt_job", str(root), str(steps), ",".join(map(str, save_at))]
    if hold:
        args.append("--hold")
    # its own process group, so a "crash" kills the job and its helpers (Megatron's checkpoint writer
    # keeps a multiprocessing Manager server that would otherwise outlive a SIGKILLed parent)
    return subprocess.Popen(args, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def crash(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_for(path, proc, timeout=300):
    t0 = time.time()
    while not os.path.exists(path):
        if proc.poll() is not None:
            raise AssertionError(f"job exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise TimeoutError(path)
        time.sleep(0.2)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    return run_ranks(1, __import__("tests.ckpt_job", fromlist=["worker"]).worker, 1, 1, str(root), 0, N, False,
                     timeout=600)[0]


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """N/2 steps and a checkpoint, then SIGKILL."""
    root = tmp_path_factory.mktemp("killed")
    proc = spawn_job(root, N // 2, [N // 2], hold=True)
    wait_for(root / "HELD", proc)
    crash(proc)
    return root


def test_resume_after_kill_is_exact(straight, killed_run):
    from .ckpt_job import worker

    first_half = json.loads((killed_run / "job_metrics.json").read_text())
    resumed = run_ranks(1, worker, 1, 1, str(killed_run), 0, N, True, timeout=600)[0]
    assert resumed["state"]["data_position"] == N // 2
    assert first_half + resumed["metrics"] == straight["metrics"]  # bit-identical losses, grad norms, LRs
    for k, w in straight["weights"].items():
        assert torch.equal(resumed["weights"][k], w), k


def test_resume_at_another_layout(straight, killed_run):
    from .ckpt_job import worker

    for tp, pp in ((2, 1), (1, 2)):
        results = run_ranks(tp * pp, worker, tp, pp, str(killed_run), 0, N, True, timeout=600)
        for r in results:
            for a, b in zip(r["metrics"], straight["metrics"][N // 2:]):
                assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6) and a["lr"] == b["lr"]
                assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
            for k, w in straight["weights"].items():
                assert torch.allclose(r["weights"][k], w, atol=2e-5), (tp, pp, k)


def test_distributed_optimizer_state_saved_from_dp_rank0_resumes_at_any_dp(tmp_path):
    """The distributed optimizer at DP 2 saves its state gathered onto data-parallel rank 0 only (the
    memory-efficient form); the checkpoint resumes bit-identically at DP 2 and to rounding at DP 1."""
    from .ckpt_job import dist_opt_worker

    root = str(tmp_path / "dp2")
    straight = run_ranks(2, dist_opt_worker, root, N, False, [N // 2], timeout=600)
    assert straight[0]["metrics"] == straight[1]["metrics"]
    for resumed_at in (2, 1):
        results = run_ranks(resumed_at, dist_opt_worker, root, N, True, [], timeout=600)
        for r in results:
            assert r["state"]["data_position"] == N // 2
            if resumed_at == 2:
                assert r["metrics"] == straight[0]["metrics"][N // 2:]
                assert all(torch.equal(r["weights"][k], w) for k, w in straight[0]["weights"].items())
            else:
                for a, b in zip(r["metrics"], straight[0]["metrics"][N // 2:]):
                    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7) and a["lr"] == b["lr"]
                for k, w in straight[0]["weights"].items():
                    assert torch.allclose(r["weights"][k], w, atol=1e-6), k


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    from megatron_hapo.training.checkpoint import complete_checkpoints, find_latest

    from .ckpt_job import worker

    # save at step 2 completes; the save at step 4 is killed with every file written, before commit
    proc = spawn_job(tmp_path, 4, [2, 4], env={"MEGATRON_HAPO_TEST_PAUSE_BEFORE_COMMIT": "600",
                                               "MEGATRON_HAPO_TEST_PAUSE_AT_STEP": "4"})
    wait_for(tmp_path / ".tmp-iter_0000004" / "PAUSED", proc)
    crash(proc)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2]
    assert find_latest(tmp_path).endswith("iter_0000002")
    assert (tmp_path / "latest").read_text().strip() == "iter_0000002"
    # the previous checkpoint loads and training goes on; the next save sweeps the killed one away
    resumed = run_ranks(1, worker, 1, 1, str(tmp_path), 0, 3, True, timeout=600)[0]
    assert resumed["state"]["data_position"] == 2 and len(resumed["metrics"]) == 1


def retention_worker(rank, world, root):
    from megatron_hapo.training.checkpoint import complete_checkpoints, save_checkpoint

    from .ckpt_job import build, run

    from megatron_hapo.models.convert import megatron_to_hf_checkpoint, read_hf_tensors

    from .tiny_models import hf_config

    policy = build()
    run(policy, root, 0, 4, save_at=[1, 2, 3, 4], keep_last=2)
    kept = [s for s, _ in complete_checkpoints(root)]
    # a training checkpoint converts to HF with the model's config.json given separately
    hf_config("qwen2").save_pretrained(f"{root}/cfg")
    megatron_to_hf_checkpoint(f"{root}/iter_0000004", f"{root}/hf_out", hf_config_dir=f"{root}/cfg", progress=False)
    exported, live = read_hf_tensors(f"{root}/hf_out"), policy.hf_state_dict()
    export_exact = sorted(exported) == sorted(live) and all(torch.equal(exported[k], live[k]) for k in live)
    overwrite = error_text(FileExistsError, save_checkpoint, root, 4, policy)
    return kept, overwrite, export_exact


def test_retention_and_refusal_to_overwrite(tmp_path):
    kept, overwrite, export_exact = run_ranks(1, retention_worker, str(tmp_path), timeout=600)[0]
    assert kept == [3, 4]
    assert export_exact, "a training checkpoint exported to HF must hold exactly the trained weights"
    assert "iter_0000004 exists" in overwrite


def _can_mount_tmpfs() -> bool:
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=1m none /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no user namespaces here to mount a small tmpfs in")
def test_disk_full_or_read_only_keeps_the_previous_checkpoint(tmp_path):
    """A 1.6 MB tmpfs holds one checkpoint (1.0 MB) but not two: the second save fails, then the
    same on the tmpfs remounted read-only. Each time: a message with the path and the free space,
    the unfinished save removed, the previous checkpoint complete, `latest` on it, and it loads."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    script = f"mount -t tmpfs -o size=1600k none {mount} && exec {sys.executable} -m tests.ckpt_job disk-full {mount}"
    res = subprocess.run(["unshare", "-Urm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert res.returncode == 0 and line, res.stdout[-2000:] + res.stderr[-4000:]
    seen = json.loads(line[len("RESULT "):])
    for case, why in (("full", "no room left: 0.0 MiB free of 1.6 MiB"), ("read_only", "Read-only file system")):
        assert f"checkpoint of step 2: writing {mount}/.tmp-iter_0000002 failed" in seen[case], seen[case]
        assert why in seen[case] and f"{mount}/iter_0000001 is complete and kept" in seen[case], seen[case]
        assert seen[f"{case}_complete"] == [1] and seen[f"{case}_left"] == ["iter_0000001", "latest"]
        assert seen[f"{case}_latest"] == "iter_0000001" and seen[f"{case}_loads"]


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no user namespaces here to mount a small tmpfs in")
def test_train_stops_with_the_message_when_the_disk_fills(tmp_path):
    """`megatron-hapo train` with its run folder on a 7.5 MB tmpfs: the built-in model (1.2 MB) and
    the step-1 checkpoint (3.9 MB) fit, the step-2 checkpoint does not: exit 1 with the message."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    overrides = [f"train.run_dir={run_dir}", "train.steps=2", "train.save_interval=1", "rollout.prompts_per_step=4",
                 "rollout.samples_per_prompt=4", "train.mini_batch_prompts=2", "train.micro_batch_size=4",
                 "rollout.dynamic_sampling=false", "eval.at_end=false", "log.progress=off", "reward.workers=0",
                 "log.tensorboard=false"]
    script = (f"mount -t tmpfs -o size=7500k none {run_dir} && "
              f"exec {sys.executable} -m megatron_hapo.train {' '.join(overrides)}")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")}
    res = subprocess.run(["unshare", "-Urm", "sh", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-4000:]
    assert f"megatron-hapo train: stopped: checkpoint of step 2: writing {run_dir}/checkpoints/.tmp-iter_0000002 " \
           "failed" in res.stderr, res.stderr[-3000:]
    assert f"{run_dir}/checkpoints/iter_0000001 is complete and kept" in res.stderr and "no room left" in res.stderr
    assert "Traceback" not in res.stderr
