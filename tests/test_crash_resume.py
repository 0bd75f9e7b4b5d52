"""A whole run killed anywhere: `megatron-hapo train` on 2 ranks under torchrun (engines, reward
workers, tool calls and their sandboxes included) is SIGKILLed 8 times at seeded moments in every
phase of a step, resumed each time with train.resume=auto, and ends bit-identical to an
uninterrupted run; after every kill nothing of the job is left. The run is multi-turn (the tool
task with rollout.tools=[python]), so rollouts hold tool turns and kills land between them.
Graceful stop: SIGTERM saves and exits 0.

One kill = what torchrun does to its workers when it gives up on them, and what srun does at the
time limit: SIGKILL to the launcher and to each worker's process group at once. Whatever escaped
those groups must die with its parent (the sandboxes do: bubblewrap's --die-with-parent).
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from megatron_hapo.rewards import sandbox_status
from megatron_hapo.spawn import free_port
from megatron_hapo.training.stop import PHASES

from .test_checkpoint import ROOT

STEPS, KILLS, SEED = 4, 8, 20261202
BASE = [f"train.steps={STEPS}", "train.save_interval=1", "train.keep_last=2", "rollout.prompts_per_step=4",
        "rollout.samples_per_prompt=4", "train.mini_batch_prompts=2", "train.micro_batch_size=4", "train.lr=1e-3",
        "rollout.dynamic_sampling=false", "eval.at_end=false", "log.progress=off", "reward.workers=2",
        "reward.type=tests.verifiers:SandboxedMath",
        # multi-turn: the tool task's model (random) writes calls every step; the python tool runs them in
        # sandboxes, so kills land with tool calls in flight (the "tools" phase) and the resume regenerates them
        "data.train=multiply", "rollout.tools=[python]", "rollout.max_response_tokens=16", "rollout.max_turns=3",
        "data.max_prompt_tokens=16",
        # the eager temperature processor (exact too): a launch skips the fused kernel's ~4 s of torch.compile
        # tracing, ten launches here; the fused kernel is checked in test_temperature_kernels and the trainer tests
        "rollout.fused_processor=false"]
VOLATILE = ("time_", "_per_s")  # wall-clock figures: the only metrics that may differ


def job_env(run_dir):
    """This process's environment without its own rank settings, with the phase markers on."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["MEGATRON_HAPO_PHASE_FILE"] = os.path.join(run_dir, "phases.log")
    return env


def launch(run_dir, extra=(), hold=None, base=BASE, env_extra=None, ranks=2):
    """`megatron-hapo train` of `base` + `extra` under torchrun on `ranks` ranks, logging to run_dir/launches.log."""
    env = {**job_env(run_dir), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if hold:
        env["MEGATRON_HAPO_TEST_HOLD"] = hold
    os.makedirs(run_dir, exist_ok=True)
    log = open(os.path.join(run_dir, "launches.log"), "a")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(ranks),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "megatron_hapo.train",
           f"train.run_dir={run_dir}", *base, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def processes():
    """{pid: (ppid, start time, state, uid, command)} of every process on the machine."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:160]
            uid = os.stat(f"/proc/{name}").st_uid
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(name)] = (int(fields[1]), int(fields[19]), fields[0], uid, cmd)
    return out


def descendants(root_pid, table):
    found, frontier = {}, [root_pid]
    while frontier:
        pid = frontier.pop()
        for child, info in table.items():
            if info[0] == pid and child not in found:
                found[child] = info
                frontier.append(child)
    return found


def kill_job(proc):
    """SIGKILL to the launcher and every worker's process group at once; returns the job's
    processes as they were the moment before."""
    table = processes()
    job = {proc.pid: table[proc.pid], **descendants(proc.pid, table)} if proc.pid in table else {}
    workers = [pid for pid, info in job.items() if info[0] == proc.pid]
    for pid in workers:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()
    proc.wait()
    return job


def left_over(job, timeout=20.0):
    """The job's processes (and any sandbox) still alive `timeout` seconds after the kill; they are
    then killed, so that a failure here does not leak into the next tests."""
    deadline = time.time() + timeout
    while True:
        table = processes()
        alive = {pid: info for pid, info in job.items()
                 if pid in table and table[pid][1] == info[1] and table[pid][2] != "Z"}
        alive.update({pid: info for pid, info in table.items() if info[3] == 65534 and info[2] != "Z"})
        if not alive or time.time() > deadline:
            break
        time.sleep(0.2)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return alive


def wait_for_marker(run_dir, marker, proc, timeout=600):
    path = os.path.join(run_dir, "phases.log")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and marker in open(path).read().splitlines():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before {marker!r}:\n" + tail(run_dir))
        time.sleep(0.05)
    raise TimeoutError(marker)


def tail(run_dir, n=4000):
    with open(os.path.join(run_dir, "launches.log")) as f:
        return f.read()[-n:]


def kill_plan(rng):
    """KILLS (step, phase, hold) moments: every phase at least once, steps in order. hold: the rank
    sleeps at the phase's start (a phase of milliseconds is hit for sure); else the kill comes a
    random 0-1.5 s after the phase began, wherever the job then is."""
    phases = list(PHASES) + rng.sample(PHASES, KILLS - len(PHASES))
    rng.shuffle(phases)
    steps = sorted(rng.randint(1, STEPS) for _ in range(KILLS))
    # at the last step always held: a late kill could otherwise come after the run finished
    return [(s, p, s == STEPS or rng.random() < 0.5) for s, p in zip(steps, phases)]


def resume_step(run_dir):
    from megatron_hapo.training.checkpoint import complete_checkpoints

    done = complete_checkpoints(os.path.join(run_dir, "checkpoints"))
    return done[-1][0] if done else 0


def final_state(run_dir, steps=STEPS, volatile=VOLATILE):
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    path = os.path.join(run_dir, "checkpoints", f"iter_{steps:07d}")
    tensors = _load_state_dict_from_keys(checkpoint_id=path)  # model and optimizer, every shard
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    state.pop("config")  # holds the run folder
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [{k: v for k, v in json.loads(x).items() if not any(w in k for w in volatile)} for x in f if x.strip()]
    return tensors, state, rows


def same_end(straight, killed, kills, steps=STEPS, volatile=VOLATILE):
    """Asserts the killed run's last checkpoint equals the straight run's (every tensor, the trainer
    state); returns both runs' metric rows (wall-clock figures left out)."""
    want_tensors, want_state, want_rows = final_state(straight, steps, volatile)
    got_tensors, got_state, got_rows = final_state(killed, steps, volatile)
    want, got = dict(flat(want_tensors)), dict(flat(got_tensors))
    assert sorted(got) == sorted(want)
    differ = [k for k in want if isinstance(want[k], torch.Tensor) and not torch.equal(want[k], got[k])]
    assert not differ, f"weights or optimizer state differ after {kills} kills: {differ[:5]}"
    assert got_state == want_state  # step, data position, HAPO's entropy statistics
    return want_rows, got_rows


def flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("straight"))
    proc = launch(run_dir)
    assert proc.wait(timeout=900) == 0, tail(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """The same run, killed KILLS times and resumed after each kill."""
    run_dir = str(tmp_path_factory.mktemp("killed"))
    rng, kills = random.Random(SEED), []
    for step, phase, hold in kill_plan(rng):
        step = max(step, resume_step(run_dir) + 1)  # an earlier late kill may have let a step finish
        if os.path.exists(os.path.join(run_dir, "phases.log")):
            os.remove(os.path.join(run_dir, "phases.log"))
        proc = launch(run_dir, hold=f"{step}:{phase}" if hold else None)
        wait_for_marker(run_dir, f"{step} {phase}", proc)
        if not hold:
            time.sleep(rng.uniform(0.0, 1.5))
        job = kill_job(proc)
        landed = open(os.path.join(run_dir, "phases.log")).read().splitlines()[-1]
        kills.append({"at": f"step {step} {phase}" + (" (held)" if hold else ""), "landed": landed,
                      "processes": job, "left": left_over(job)})
        print(f"kill {len(kills)}: at {kills[-1]['at']}, the job was at {landed!r}, {len(job)} processes, "
              f"{len(kills[-1]['left'])} left", flush=True)
    proc = launch(run_dir)
    assert proc.wait(timeout=900) == 0, tail(run_dir)
    return run_dir, kills


def test_kill_anywhere_then_resume_is_bit_identical(straight, killed):
    run_dir, kills = killed
    assert len(kills) == KILLS and {k["at"].split()[2] for k in kills} == set(PHASES)
    want_rows, got_rows = same_end(straight, run_dir, KILLS)
    assert all(r["tool_calls"] > 0 for r in want_rows)  # every step had tool turns
    assert [r["step"] for r in got_rows] == list(range(1, STEPS + 1))  # one row a step: none lost, none twice
    assert got_rows == want_rows
    resumed = [line for line in tail(run_dir, 10**7).splitlines() if "resumed from" in line]
    assert len(resumed) >= 1, "no launch resumed from a checkpoint"


def test_nothing_of_the_job_survives_a_kill(killed):
    _, kills = killed
    for k in kills:
        assert not k["left"], (f"killed at {k['at']} (the job was at {k['landed']!r}); left running: "
                               + "; ".join(f"{pid} {info[4]}" for pid, info in k["left"].items()))
    seen = " ".join(info[4] for k in kills for info in k["processes"].values())
    assert "multiprocessing" in seen  # the reward workers were part of what was killed
    if sandbox_status()[0]:
        assert any(info[3] == 65534 for k in kills for info in k["processes"].values()), "no sandbox was running at a kill"


def test_sigterm_saves_at_the_next_step_and_exits_zero(tmp_path):
    """What Slurm's --signal or torchrun's shutdown sends first: a checkpoint at the next safe point."""
    run_dir = str(tmp_path)
    proc = launch(run_dir, ["train.save_interval=0", "train.steps=50"])
    wait_for_marker(run_dir, "2 rollout", proc)
    table = processes()
    for pid in [p for p, info in table.items() if info[0] == proc.pid]:
        os.kill(pid, signal.SIGTERM)  # the workers (torchrun would forward it the same way)
    assert proc.wait(timeout=600) == 0, tail(run_dir)
    from megatron_hapo.training.checkpoint import find_latest

    latest = find_latest(os.path.join(run_dir, "checkpoints"))
    assert latest and latest.endswith("iter_0000002"), latest
    assert "stop requested (SIGTERM)" in tail(run_dir)


def test_a_rank_killed_alone_takes_its_helpers_along(tmp_path):
    """`kill -9` on a run started without torchrun (or the OOM killer picking a rank): no process
    group kill follows, yet the reward workers, their sandboxes and the checkpoint writer's Manager
    (started at the step-1 save) must not outlive it."""
    run_dir = str(tmp_path)
    env = job_env(run_dir)
    with open(os.path.join(run_dir, "launches.log"), "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "megatron_hapo.train", f"train.run_dir={run_dir}", *BASE], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_marker(run_dir, "2 scoring", proc)
    time.sleep(0.5)  # into the scoring: sandboxes running
    table = processes()
    job = descendants(proc.pid, table)
    proc.kill()  # the rank alone
    proc.wait()
    helpers = [info[4] for info in job.values() if "multiprocessing" in info[4]]
    assert len(helpers) >= 4, helpers  # 2 reward workers, the resource tracker, the writer's Manager
    left = left_over(job)
    assert not left, "left running: " + "; ".join(f"{pid} {info[4]}" for pid, info in left.items())
