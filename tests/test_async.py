"""Asynchronous schedules (rollout.placement=separate): one trainer rank and one engine rank under
torchrun, SIGKILLed at seeded moments and resumed with train.resume=auto.

- One step off policy (lockstep, max_staleness=1): the killed run ends bit-identical to the run
  never killed: weights, optimizer state, step, data position, entropy statistics, every metric
  row (the rollouts made ahead for the next step are kept in each checkpoint); and so does the same
  run with two engine ranks.
- Partial rollouts at staleness 2 (stale=drop, dynamic sampling on): nothing lost or duplicated:
  every data position the steps consumed (trained or filtered), over all launches, once; a version landed mid-response (a response spans two
  versions), every token's staleness is within the bound, and at the tokens sampled under the
  trainer's current weights (continued parts included) the engine's log-probs equal the trainer's.
After every kill nothing of the job is left.
"""
import json
import os
import random
import subprocess
import sys
import time

import pytest

from megatron_hapo.compare import arm_overrides
from megatron_hapo.config import Config, ConfigError

from .test_checkpoint import ROOT
from . import test_crash_resume as crash
from .test_crash_resume import kill_job, left_over, tail, wait_for_marker

STEPS, SEED = 4, 20261205
# kills per run (suite: 1 one step off, 2 partial; MEGATRON_HAPO_TEST_KILLS=N for a longer hunt)
KILLS = os.environ.get("MEGATRON_HAPO_TEST_KILLS")
BASE = [f"train.steps={STEPS}", "train.save_interval=1", "train.keep_last=2", "rollout.prompts_per_step=4",
        "rollout.samples_per_prompt=4", "train.mini_batch_prompts=2", "train.micro_batch_size=4", "train.lr=1e-3",
        "rollout.dynamic_sampling=false", "eval.at_end=false", "log.progress=off", "reward.workers=0",
        "reward.type=tests.verifiers:HasSeven", "rollout.max_response_tokens=40", "data.max_prompt_tokens=16",
        "rollout.placement=separate", "rollout.engine_ranks=1", "algorithm.rollout_correction=tis", "eval.interval=2",
        "eval.num_prompts=8"]
OFF1 = ["rollout.max_staleness=1"]
PARTIAL = ["rollout.max_staleness=2", "rollout.partial=true", "rollout.stale=drop", "train.steps=8",
           "rollout.dynamic_sampling=true", "train.lr=1e-4"]  # slower learning: groups stay mixed over 8 steps
VOLATILE = ("time_", "_per_s", "idle_frac", "engine_")


def test_schedule_settings_are_checked():
    def error(*items):
        with pytest.raises(ConfigError) as e:
            Config.load(None, list(items))
        return str(e.value)

    assert "rollout.max_staleness" in error("rollout.max_staleness=1")  # colocated: nothing to overlap
    assert "rollout.engine_ranks" in error("rollout.placement=separate")
    assert "rollout.partial" in error("rollout.placement=separate", "rollout.engine_ranks=1", "rollout.partial=true")
    assert "rollout.stale" in error("rollout.stale=later")
    assert "rollout.placement" in error("rollout.placement=remote")
    assert "rollout.partial" in error("rollout.placement=separate", "rollout.engine_ranks=1", "rollout.max_staleness=1",
                                      "rollout.partial=true", "rollout.tools=[python]")
    cfg = Config.load(None, ["rollout.placement=separate", "rollout.engine_ranks=2",
                             "parallel.inference_tensor_parallel_size=2", "rollout.prompts_per_step=8"])
    cfg.validate(2)  # the trainers' world: two ranks train, two more host one engine
    with pytest.raises(ConfigError, match="engine_ranks"):
        Config.load(None, ["rollout.placement=separate", "rollout.engine_ranks=3",
                           "parallel.inference_tensor_parallel_size=2"]).validate(1)
    # against the launch's world, at load, before any process group (seconds, one line naming the setting)
    separate = ["rollout.placement=separate", "rollout.prompts_per_step=4"]
    for world, extra, name in ((2, ["rollout.engine_ranks=2"], "rollout.engine_ranks=2"),
                               (4, ["rollout.engine_ranks=3", "parallel.inference_tensor_parallel_size=2"], "multiple of"),
                               (4, ["rollout.engine_ranks=2", "rollout.max_staleness=1", "rollout.partial=true"],
                                "one engine only")):
        with pytest.raises(ConfigError, match=name):
            Config.load(None, separate + extra).validate_launch(world)
    Config.load(None, separate + ["rollout.engine_ranks=1"]).validate_launch(2)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "MASTER_PORT")}
    res = subprocess.run([sys.executable, "-m", "megatron_hapo.train", "rollout.placement=separate", "rollout.engine_ranks=2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env={**env, "WORLD_SIZE": "2"})
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "megatron-hapo train: config: rollout.engine_ranks=2: separate placement needs at least one engine rank and one "
        "trainer rank among the launch's 2 (torchrun --nproc-per-node × nodes)"], res.stderr[-2000:]
    assert arm_overrides("hapo-off1") == {"algorithm.name": "hapo", "rollout.placement": "separate",
                                          "rollout.engine_ranks": "1", "rollout.max_staleness": "1",
                                          "rollout.partial": "false", "algorithm.rollout_correction": "tis"}
    assert arm_overrides("dapo-off2-partial")["rollout.partial"] == "true"
    assert "algorithm.rollout_correction" not in arm_overrides("hapo-sep")
    with pytest.raises(ValueError, match="offN|off<N>"):
        arm_overrides("hapo-off")


def launch(run_dir, extra, ranks=2):
    # partial rollouts: 15 ms more a decoding step, so generation outlasts an update and versions land mid-response
    return crash.launch(run_dir, extra, base=BASE, env_extra={"PYTHONPATH": ROOT, "MEGATRON_HAPO_TEST_STEP_SLEEP": "0.015"},
                        ranks=ranks)


def rows_of(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f if x.strip()]


def killed_run(run_dir, extra, kills, rng, last=STEPS, first=1):
    """The run SIGKILLed `kills` times (each 0-0.5 s after a seeded step reached a seeded phase, on
    whichever rank was where), resumed after each; the kills' records."""
    out = []
    steps = sorted(rng.randint(first, last) for _ in range(kills))
    for step in steps:
        phase = rng.choice(("rollout", "old_pass", "update", "weight_sync", "checkpoint"))
        if os.path.exists(os.path.join(run_dir, "phases.log")):
            os.remove(os.path.join(run_dir, "phases.log"))
        proc = launch(run_dir, extra)
        wait_for_marker(run_dir, f"{step} {phase}", proc)  # "rollout": the engine's or the trainer's, whichever first
        time.sleep(rng.uniform(0.0, 0.5))
        job = kill_job(proc)
        landed = open(os.path.join(run_dir, "phases.log")).read().splitlines()[-1]
        out.append({"at": f"{step} {phase}", "landed": landed, "processes": job, "left": left_over(job)})
        print(f"kill {len(out)}: in step {step}, the job was at {landed!r}, {len(job)} processes, "
              f"{len(out[-1]['left'])} left", flush=True)
    proc = launch(run_dir, extra)
    assert proc.wait(timeout=600) == 0, tail(run_dir)
    return out


@pytest.fixture(scope="module")
def off1(tmp_path_factory):
    straight = str(tmp_path_factory.mktemp("off1-straight"))
    proc = launch(straight, OFF1)
    assert proc.wait(timeout=600) == 0, tail(straight)
    run_dir = str(tmp_path_factory.mktemp("off1-killed"))
    kills = killed_run(run_dir, OFF1, int(KILLS or 1), random.Random(SEED), first=2)  # after a checkpoint: a resume
    two = str(tmp_path_factory.mktemp("off1-two-engines"))  # the same run with two engines (three ranks)
    proc = launch(two, OFF1 + ["rollout.engine_ranks=2"], ranks=3)
    assert proc.wait(timeout=600) == 0, tail(two)
    return straight, run_dir, kills, two


def test_one_step_off_resumes_bit_identical_after_kills(off1):
    straight, run_dir, kills, _ = off1
    want_rows, got_rows = crash.same_end(straight, run_dir, len(kills), STEPS, VOLATILE)
    assert [r["step"] for r in got_rows] == list(range(1, STEPS + 1))
    assert got_rows == want_rows
    # one step off: step 1 on the initial weights, then every step's tokens exactly one version behind
    assert [r["staleness_max"] for r in want_rows] == [0.0] + [1.0] * (STEPS - 1)
    assert all(r["staleness_mean"] == r["staleness_max"] for r in want_rows)
    assert all(r["rollout_correction_weight_mean"] > 0 for r in want_rows)
    assert sum("resumed from" in line for line in tail(run_dir, 10**7).splitlines()) >= 1
    for k in kills:
        assert not k["left"], f"killed in step {k['at']} ({k['landed']!r}); left: {k['left']}"
    assert any("megatron_hapo.train" in info[4] for k in kills for info in k["processes"].values())


def test_partial_rollouts_lose_and_repeat_nothing_across_kills(tmp_path):
    run_dir = str(tmp_path)
    kills = killed_run(run_dir, PARTIAL, int(KILLS or 2), random.Random(SEED + 1), last=4)
    rows = rows_of(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))  # the kills in steps 1-4: the last launch runs 4 or more
    used = [p for r in rows for p in r["positions_seen"]]
    assert len(used) == len(set(used)), f"a prompt used twice: {sorted(used)}"
    frontier = rows[-1]["data_position"]
    assert set(range(frontier)) <= set(used), f"a prompt lost below the frontier {frontier}: {sorted(used)}"
    assert all(r["staleness_max"] <= 2 for r in rows)  # drop: a group with a token more stale is not trained on
    assert rows[0]["staleness_max"] == 0 and any(r["versions_per_response_max"] >= 2 for r in rows)  # a version landed mid-response
    # exact across switches: at the tokens sampled under the weights the old pass runs (continued parts
    # included) the engine's log-probs, at T = 1 and at each token's temperature, are the trainer's
    compared = [r for r in rows if "logp_mismatch_max" in r]
    assert compared and all(r["logp_mismatch_max"] < 1e-4 and r["logp_mismatch_at_t_max"] < 1e-4 for r in compared), \
        [(r["step"], r.get("logp_mismatch_max"), r.get("logp_mismatch_at_t_max")) for r in rows]
    for k in kills:
        assert not k["left"], f"killed in step {k['at']} ({k['landed']!r}); left: {k['left']}"


def test_two_engines_give_the_same_run(off1):
    """Each engine generates its slice of a step's prompts, seeded by position: two engines (their ranks
    agreeing on every message they act on, evaluation included) make the one-engine run exactly."""
    straight, _, _, two = off1
    want_rows, got_rows = crash.same_end(straight, two, 0, STEPS, VOLATILE)
    assert got_rows == want_rows


def test_colocated_equals_separate_at_staleness_zero(tmp_path):
    """Placement changes where rollouts are made, not what a step computes: the same run colocated (one
    rank) and separate with max_staleness=0 (one trainer rank, one engine rank) ends with the same
    weights, optimizer state and trainer state, and the same metric rows apart from timings and the
    separate placement's own keys (staleness, versions per response, idle shares). ~75 s: two launches."""
    steps = 2
    common = [f"train.steps={steps}", "rollout.max_staleness=0"]
    colocated, separate = str(tmp_path / "colocated"), str(tmp_path / "separate")
    procs = [launch(colocated, common + ["rollout.placement=colocated"], ranks=1)]
    assert procs[0].wait(timeout=600) == 0, tail(colocated)
    procs.append(launch(separate, common))
    assert procs[1].wait(timeout=600) == 0, tail(separate)
    want_rows, got_rows = crash.same_end(colocated, separate, 0, steps, VOLATILE)
    own = ("staleness_mean", "staleness_max", "staleness_tokens_0", "versions_per_response_max")
    assert [set(g) - set(w) for g, w in zip(got_rows, want_rows)] == [set(own)] * steps, (got_rows[0], want_rows[0])
    # weight_sync_bytes: the colocated engine counts what it loads, the tied lm_head's copy of the embedding
    # included; the bridge counts what it sends, the walk's tensors without it
    with open(os.path.join(colocated, "initial_model", "config.json")) as f:
        hf = json.load(f)
    assert hf["tie_word_embeddings"]
    head = hf["vocab_size"] * hf["hidden_size"] * 4
    assert [w["weight_sync_bytes"] - g["weight_sync_bytes"] for g, w in zip(got_rows, want_rows)] == [head] * steps
    same = ("weight_sync_bytes",)
    assert [{k: v for k, v in g.items() if k not in own + same} for g in got_rows] == \
        [{k: v for k, v in w.items() if k not in same} for w in want_rows]
    assert all(g["staleness_max"] == 0 for g in got_rows)
    assert any("eval" in k for k in want_rows[1])  # evaluation (eval.interval=2) compared too
