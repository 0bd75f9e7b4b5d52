"""The RL loop end to end on the built-in addition task: metrics, checkpoint, resume, statistics
reaching the engine on step 2, dynamic sampling's give-up, config errors."""
import json

import pytest

from megatron_hapo.config import Config

from .distributed import run_ranks


def train_worker(rank, world, run_dir, steps, extra):
    from megatron_hapo.trainer import Trainer

    cfg = Config.load(None, [f"train.run_dir={run_dir}", f"train.steps={steps}", "rollout.prompts_per_step=4",
                             "rollout.samples_per_prompt=4", "train.mini_batch_prompts=2", "train.micro_batch_size=4",
                             "train.lr=1e-4", *extra])
    trainer = Trainer(cfg)
    start = trainer.step
    try:
        history = trainer.fit()
        error = None
    except RuntimeError as exc:
        history, error = [], str(exc)
    return {"start": start, "history": history, "error": error}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    first = run_ranks(1, train_worker, str(root), 3, ["rollout.dynamic_sampling=false"], timeout=600)[0]
    second = run_ranks(1, train_worker, str(root), 4, ["rollout.dynamic_sampling=false"], timeout=600)[0]
    return root, first, second


def test_loop_writes_metrics_and_checkpoint(run):
    root, first, _ = run
    assert [m["step"] for m in first["history"]] == [1, 2, 3]
    lines = [json.loads(l) for l in (root / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for key in ("reward", "accuracy", "rollout_accuracy", "entropy", "temperature_min", "temperature_max", "clip_frac_low", "clip_frac_high",
                "hapo_adv_changed_frac", "logp_mismatch_mean", "keep_rate", "grad_norm", "weight_sync_s", "tokens_per_s"):
        assert key in lines[0], key
    assert (root / "checkpoints" / "iter_0000003" / "COMPLETE").exists()
    assert Config.load(None, []).dump().splitlines()[0] == (root / "config.yaml").read_text().splitlines()[0]


def test_statistics_reach_the_engine_on_step_two(run):
    _, first, _ = run
    h = first["history"]
    assert h[0]["temperature_min"] == h[0]["temperature_max"] == 1.0
    assert h[1]["temperature_min"] < 1.0 < h[1]["temperature_max"] <= 1.05 + 1e-6
    for m in h:
        assert m["logp_mismatch_max"] < 1e-4, m  # the engine always samples from the trainer's weights


def test_resume_continues_from_the_checkpoint(run):
    _, _, second = run
    assert second["start"] == 3 and [m["step"] for m in second["history"]] == [4]
    assert second["history"][0]["temperature_min"] < 1.0  # statistics restored, not reset


def test_dynamic_sampling_gives_up_with_a_clear_error(tmp_path):
    # an untrained model never solves addition: no informative group, so it must stop after 2 batches
    out = run_ranks(1, train_worker, str(tmp_path), 1, ["rollout.max_num_gen_batches=2"], timeout=600)[0]
    assert "max_num_gen_batches" in out["error"] and "after 2 generation batches" in out["error"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.mini_batch_prompts=3"], "does not divide rollout.prompts_per_step=8"),
        (["train.micro_batch_size=3"], "micro_batch_size=3 does not divide"),
        (["parallel.tensor_model_parallel_size=3"], "not divisible by tensor×pipeline = 3"),
        (["rollout.overlong_buffer=50"], "overlong_buffer=50 exceeds"),
        (["algorithm.sign_mode=mirror"], "algorithm.sign_mode"),
        (["train.stepz=2"], "unknown settings \\['stepz'\\]"),
        (["algorithm.kappa=2"], "unknown settings \\['kappa'\\]"),
        (["train"], "expected key.sub=value"),
    ],
)
def test_config_errors_name_the_setting(overrides, match):
    with pytest.raises(ValueError, match=match):
        Config.load(None, overrides).validate(world_size=2)


def demo_worker(rank, world, root):
    import torch.distributed as dist

    from megatron_hapo.demo import run_demo

    dist.destroy_process_group()  # the demo starts its trainers the way `make demo` does
    return run_demo(root, warmup_steps=200, rl_steps=2, algorithms=("hapo", "dapo"))


def test_demo_pipeline_small(tmp_path):
    results = run_ranks(1, demo_worker, str(tmp_path / "demo"), timeout=600)[0]
    assert set(results) == {"hapo", "dapo"}
    for r in results.values():
        assert 0.0 <= r["before"] <= 1.0 and 0.0 <= r["after"] <= 1.0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["warmup"]["after"] > summary["warmup"]["before"], summary  # the warm-up learned something
    assert (tmp_path / "demo" / "comparison.png").stat().st_size > 1000
