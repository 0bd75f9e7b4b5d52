"""The RL loop end to end on the built-in addition task: metrics, checkpoint, resume, statistics
reaching the engine on step 2, dynamic sampling's give-up, config errors."""
import json
import os

import pytest

from megatron_hapo.config import Config

from .distributed import run_ranks


def train_worker(rank, world, run_dir, steps, extra):
    from megatron_hapo.trainer import Trainer

    cfg = Config.load(None, [f"train.run_dir={run_dir}", f"train.steps={steps}", "rollout.prompts_per_step=4",
                             "rollout.samples_per_prompt=4", "train.mini_batch_prompts=2", "train.micro_batch_size=4",
                             "train.lr=1e-4", "log.progress=off", *extra])
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
    extra = ["rollout.dynamic_sampling=false", "eval.interval=2", "eval.num_prompts=16"]
    first = run_ranks(1, train_worker, str(root), 3, extra, timeout=600)[0]
    second = run_ranks(1, train_worker, str(root), 4, extra, timeout=600)[0]
    return root, first, second


def test_loop_writes_metrics_and_checkpoint(run):
    root, first, _ = run
    assert [m["step"] for m in first["history"]] == [1, 2, 3]
    lines = [json.loads(l) for l in (root / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for key in ("reward", "accuracy", "rollout_accuracy", "entropy", "temperature_min", "temperature_max", "clip_frac_low", "clip_frac_high",
                "hapo_adv_changed_frac", "logp_mismatch_mean", "keep_rate", "grad_norm", "time_weight_sync", "tokens_per_s", "rollout_tokens_per_s", "time_old_pass",
                "reward_timeouts", "reward_errors", "truncated_frac", "data_position", "weight_sync_bytes"):
        assert key in lines[0], key
    assert (root / "checkpoints" / "iter_0000003" / "COMPLETE").exists()
    saved = Config.from_dict(__import__("yaml").safe_load((root / "config.yaml").read_text()))
    assert saved.train.steps == 4 and saved.eval.interval == 2  # the effective config of the (latest) run
    assert [("eval_mean@1" in m) for m in lines] == [False, True, True, True]  # every 2 steps and at the end
    assert 0.0 <= lines[1]["eval_mean@1"] <= 1.0 and lines[1]["eval_prompts"] == 16
    assert lines[0]["data_position"] == 4 and lines[0]["reward_timeouts"] == 0


def test_tensorboard_and_token_samples(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _, _ = run
    acc = EventAccumulator(str(root / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("rollout/reward", "rollout/rollout_accuracy", "rollout/keep_rate", "train/loss", "train/clip_frac_high",
                "entropy/entropy", "entropy/entropy_sigma", "entropy/entropy_z_pos", "temperature/temperature_max", "mismatch/logp_mismatch_mean", "time/time_rollout",
                "eval/eval_mean@1", "train/hapo_adv_changed_frac"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in acc.Scalars("rollout/reward")][:3] == [1, 2, 3]
    for tag in ("distributions/h_hat", "distributions/entropy", "distributions/temperature"):
        assert tag in tags["histograms"], tag
    samples = [json.loads(l) for l in (root / "token_samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 2, 3, 4]
    for s in samples:
        assert 0 < len(s["entropy"]) == len(s["temperature"]) <= 2048
    assert all(t == 1.0 for t in samples[0]["temperature"]) and len(set(samples[1]["temperature"])) > 1


def test_plot_command_writes_pngs(run, tmp_path):
    from megatron_hapo.cli import main

    root, _, _ = run
    assert main(["plot", str(root), str(root), "--out", str(tmp_path / "plots")]) == 0
    for name in ("curves.png", "distributions.png", "temperature_vs_entropy.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 10_000, name
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        main(["plot", str(tmp_path)])


def test_statistics_reach_the_engine_on_step_two(run):
    _, first, _ = run
    h = first["history"]
    assert h[0]["temperature_min"] == h[0]["temperature_max"] == 1.0
    assert h[1]["temperature_min"] < 1.0 < h[1]["temperature_max"] <= 1.05 + 1e-6
    for m in h:
        assert m["logp_mismatch_max"] < 1e-4, m  # the engine always samples from the trainer's weights
        assert m["logp_mismatch_at_t_max"] < 1e-4, m  # and records the temperature it sampled at


def test_resume_continues_from_the_checkpoint(run):
    _, _, second = run
    assert second["start"] == 3 and [m["step"] for m in second["history"]] == [4]
    assert second["history"][0]["temperature_min"] < 1.0  # statistics restored, not reset
    assert second["history"][0]["data_position"] == 16  # the data position too: step 4 takes prompts 12..15


def test_dynamic_sampling_gives_up_with_a_clear_error(tmp_path):
    # an untrained model never solves addition: no informative group, so it must stop after 2 batches
    out = run_ranks(1, train_worker, str(tmp_path), 1, ["rollout.max_num_gen_batches=2"], timeout=600)[0]
    assert "max_num_gen_batches" in out["error"] and "after 8 groups (2 generation batches" in out["error"]
    assert "the groups seen: 8 all wrong" in out["error"], out["error"]  # says which kind of uninformative


def test_dataset_file_with_malformed_rows_and_a_hanging_reward(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "12+34="}], "reward_model": {"ground_truth": "hang"}}]
    rows += [{"prompt": [{"role": "user", "content": f"{a}+{a}="}], "reward_model": {"ground_truth": str(2 * a)}}
             for a in range(10, 20)]
    lines = [json.dumps(r) for r in rows] + ['{"prompt": "1+1=",', json.dumps({"prompt": "1+1="})]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    extra = [f"data.train={tmp_path / 'train.jsonl'}", "data.shuffle=false", "rollout.dynamic_sampling=false",
             "reward.type=tests.verifiers:HangOnGroundTruth", "reward.timeout_s=2", "algorithm.name=dapo",
             "log.progress=on"]  # the progress-bar path runs too (tqdm on stderr)
    out = run_ranks(1, train_worker, str(tmp_path / "run"), 1, extra, timeout=600)[0]
    m = out["history"][0]
    assert m["reward_timeouts"] == 4 and m["reward_errors"] == 0  # the 4 samples of the "hang" row, nothing else
    assert m["data_skipped_rows"] == 2 and m["reward"] == -1.0  # math rewards are ±1; nothing solved
    strict = run_ranks(1, strict_worker, str(tmp_path / "strict"), [*extra, "data.strict=true"], timeout=300)[0]
    assert "malformed row at train.jsonl:12: invalid JSON" in strict


def strict_worker(rank, world, run_dir, extra):
    try:
        train_worker(rank, world, run_dir, 1, extra)
    except ValueError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.mini_batch_prompts=6"], "mini_batch_prompts=6 does not divide rollout.prompts_per_step=8"),
        (["train.micro_batch_size=3"], "micro_batch_size=3 does not divide"),
        (["parallel.tensor_model_parallel_size=3"], "not divisible by tensor×pipeline = 3"),
        (["rollout.overlong_buffer=50"], "overlong_buffer=50 exceeds"),
        (["algorithm.sign_mode=mirror"], "algorithm.sign_mode"),
        (["train.stepz=2"], "unknown settings \\['stepz'\\]"),
        (["algorithm.kappa=2"], "unknown settings \\['kappa'\\]"),
        (["train"], "expected key.sub=value"),
        (["parallel.inference_tensor_parallel_size=4"], "inference_tensor_parallel_size=4 does not divide the world size 2"),
        (["rollout.prompts_per_step=9", "train.mini_batch_prompts=9", "train.micro_batch_size=1"], "does not divide over 2"),
        (["reward.type=regex"], "reward.type: unknown verifier 'regex'"),
        (["reward.timeout_s=0"], "reward.timeout_s positive"),
        (["eval.n=4"], "greedy decoding gives n identical samples"),
        (["eval.top_p=0"], "0 < top_p"),
        (["log.progress=sometimes"], "log.progress"),
        (["data.train=[1, 2]"], "data.train: expected a path or source name"),
        (["data.nope=1"], "config.data: unknown settings \\['nope'\\]"),
    ],
)
def test_config_errors_name_the_setting(overrides, match):
    with pytest.raises(ValueError, match=match):
        Config.load(None, overrides).validate(world_size=2)


def demo_worker(rank, world, root):
    import torch.distributed as dist

    from megatron_hapo.demo import run_demo

    dist.destroy_process_group()  # the demo starts its trainers the way `make demo` does
    run_demo(root, warmup_steps=200, rl_steps=1, algorithms=("hapo",))  # an earlier demo left its runs behind
    return run_demo(root, warmup_steps=200, rl_steps=2, algorithms=("hapo", "dapo"))


def test_demo_pipeline_small(tmp_path):
    results = run_ranks(1, demo_worker, str(tmp_path / "demo"), timeout=600)[0]
    assert set(results) == {"hapo", "dapo"}
    for r in results.values():
        assert 0.0 <= r["before"] <= 1.0 and 0.0 <= r["after"] <= 1.0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["warmup"]["after"] > summary["warmup"]["before"], summary  # the warm-up learned something
    assert (tmp_path / "demo" / "comparison.png").stat().st_size > 1000


LAYOUT_EXTRA = ["rollout.dynamic_sampling=false", "rollout.prompts_per_step=4", "train.mini_batch_prompts=4",
                "train.micro_batch_size=4", "rollout.max_response_tokens=16",
                "eval.num_prompts=7",  # odd: two engines take 4 and 3, none is dropped
                # multi-turn: the tool task's (random) model writes calls; the python tool answers them
                "data.train=multiply", "rollout.tools=[python]", "rollout.max_turns=3", "data.max_prompt_tokens=16"]
ROLLOUT_KEYS = ("reward", "rollout_accuracy", "response_length", "response_tokens", "data_position", "tool_calls",
                "tool_errors", "turns_per_sample")


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    history = run_ranks(1, train_worker, str(root / "one"), 2, LAYOUT_EXTRA, timeout=600)[0]["history"]
    return root, history


@pytest.mark.parametrize("layout", [
    ["parallel.inference_tensor_parallel_size=1"],  # DP 2, an engine per rank
    ["parallel.inference_tensor_parallel_size=2"],  # DP 2, one engine over both ranks (external_launcher)
    ["parallel.tensor_model_parallel_size=2"],  # TP 2, an engine per rank
], ids=["dp2", "dp2-inference-tp2", "tp2"])
def test_two_rank_layouts_match_one_rank(single_rank, layout):
    """Samples depend only on (seed, prompt position): two ranks see the same rollouts as one, and
    the update (global token-mean, DP entropy statistics) matches to float precision; with multi-turn
    samples (tool turns inside responses; under inference TP 2 the engine's first rank runs the tools)."""
    root, one = single_rank
    extra = LAYOUT_EXTRA + layout + [f"model.hf_path={root / 'one' / 'initial_model'}"]
    ranks = run_ranks(2, train_worker, str(root / layout[0].split("=")[0].split(".")[-1] / layout[0][-1]), 2, extra,
                      timeout=900)
    for history in (r["history"] for r in ranks):
        for a, b in zip(one, history):
            for key in ROLLOUT_KEYS:
                assert a[key] == b[key], (key, a[key], b[key])
            for key in ("loss", "entropy", "grad_norm", "temperature_min", "temperature_max", "entropy_q"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a[key], b[key])
            assert b["logp_mismatch_max"] < 1e-4
        assert history[-1]["eval_prompts"] == one[-1]["eval_prompts"] == 7  # every eval prompt, whatever the layout
        assert history[-1]["eval_mean@1"] == one[-1]["eval_mean@1"]
    assert one[1]["temperature_min"] < 1.0 < one[1]["temperature_max"]
    assert sum(m["tool_calls"] for m in one) > 0  # tool turns in the rollouts compared


@pytest.mark.parametrize("name", ["hapo", "dapo"])
def test_cluster_recipes_validate_for_their_world(name):
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "qwen2.5-math-7b" / f"{name}.yaml"
    cfg = Config.load(str(path)).validate(world_size=32)  # 4 nodes × 8 GPUs
    assert cfg.algorithm.name == name and cfg.rollout.prompts_per_step == 512 and cfg.train.lr == 1e-6
    # the authors' recipe: 10 warm-up steps counted in rollout steps, HAPO's clip 0.2/0.2, six benchmarks
    assert (cfg.train.lr_warmup_steps, cfg.train.lr_warmup_unit) == (10, "rollout_steps")
    assert cfg.algorithm.eps_high == {"hapo": 0.2, "dapo": 0.28}[name] and len(cfg.data.eval) == 6
    with pytest.raises(ValueError, match="does not divide over 12 data-parallel ranks"):
        cfg.validate(world_size=48)


def compare_worker(rank, world, out):
    import torch.distributed as dist

    from megatron_hapo import compare
    from megatron_hapo.compare import run_compare

    dist.destroy_process_group()  # the command starts its trainers itself
    # a warm-up into a band it cannot reach at this size: checked at steps 2, 4 and 6, stopped at its maximum
    compare.WARMUP["chain"] = compare.Warmup(6, 2e-3, band=(0.9, 1.0), check_every=2, first_check=2, check_prompts=8)
    small = {"rollout.prompts_per_step": 4, "train.mini_batch_prompts": 4, "rollout.samples_per_prompt": 4,
             "train.micro_batch_size": 16, "rollout.dynamic_sampling": "false"}
    first = run_compare(out, "chain", ("hapo", "dapo"), seeds=(0, 1), steps=2, eval_interval=1, eval_prompts=8,
                        final_eval_prompts=12, extra=small)
    # seed 1's warm-up model broken on disk: its new run fails at the start, is recorded, and the study goes on
    with open(os.path.join(out, "seed1", "warmup", "model", "model.safetensors"), "r+b") as f:
        f.truncate(100)
    # an ablation arm added to the study: the warm-ups and the finished arms are kept, only hapo-no-C runs
    more = run_compare(out, "chain", ("hapo", "dapo", "hapo-no-C"), seeds=(0, 1), steps=2, eval_interval=1,
                       eval_prompts=8, final_eval_prompts=12, extra=small, reference="hapo", reuse=True)
    return first, more, compare.exit_code(more), compare.exit_code({"arms": {**more["arms"], "x": {"accuracy": []}}})


def test_compare_command_at_toy_size(tmp_path):
    """Algorithms x seeds from one shared warm-up per seed (to a band of accuracy, at most its steps):
    table, paired differences, bands; a run that fails is recorded and the study goes on."""
    s, more, code, code_empty = run_ranks(1, compare_worker, str(tmp_path / "cmp"), timeout=900)[0]
    assert s["warmup_steps"] == [6, 6] and s["warmup"]["band"] == [0.9, 1.0]  # never in the band: stopped at the maximum
    assert more["warmup_accuracy"] == s["warmup_accuracy"] and more["reference"] == "hapo"
    assert more["arms"]["hapo"]["accuracy"] == s["arms"]["hapo"]["accuracy"]  # reused, not rerun
    no_c = more["arms"]["hapo-no-C"]
    assert no_c["seeds"] == [0] and len(no_c["accuracy"]) == 1 and list(no_c["failed"]) == ["1"], no_c
    assert (tmp_path / "cmp" / "seed1" / "hapo-no-C" / "failed.json").exists()
    assert "failed: hapo-no-C seed 1:" in (tmp_path / "cmp" / "table.md").read_text()
    assert (code, code_empty) == (0, 1)  # non-zero only when a whole arm has no result
    assert more["arms"]["hapo"]["minus_hapo"] == [0.0, 0.0]
    cfg = (tmp_path / "cmp" / "seed0" / "hapo-no-C" / "config.yaml").read_text()
    assert "redistribute: false" in cfg and "adaptive_clip: true" in cfg
    assert set(s["arms"]) == {"hapo", "dapo"} and s["reference"] == "dapo" and len(s["warmup_accuracy"]) == 2
    hapo, dapo = s["arms"]["hapo"], s["arms"]["dapo"]
    assert len(hapo["accuracy"]) == 2 and dapo["minus_dapo"] == [0.0, 0.0]
    assert hapo["minus_dapo"] == pytest.approx([h - d for h, d in zip(hapo["accuracy"], dapo["accuracy"])])
    assert hapo["accuracy_ci95"] == hapo["accuracy_ci95"]  # finite with 2 seeds
    assert dapo["temperature_mean_last5"] == 1.0  # no adaptive temperature in DAPO
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert "| hapo |" in table and "| dapo |" in table
    assert (tmp_path / "cmp" / "curves.png").stat().st_size > 10_000
    rows = [json.loads(x) for x in (tmp_path / "cmp" / "seed1" / "hapo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2] and all("eval_mean@1" in m for m in rows)
    assert [m["eval_prompts"] for m in rows] == [8, 12]  # the last evaluation on final_eval_prompts
    assert rows[1]["temperature_min"] < 1.0 < rows[1]["temperature_max"]  # HAPO A from step 2 on


def tool_compare_worker(rank, world, out):
    import torch.distributed as dist

    from megatron_hapo.compare import run_compare

    dist.destroy_process_group()
    small = {"rollout.prompts_per_step": 4, "train.mini_batch_prompts": 4, "rollout.samples_per_prompt": 4,
             "train.micro_batch_size": 16, "rollout.dynamic_sampling": "false", "reward.workers": 0}
    tools = run_compare(f"{out}/cmp", "multiply", ("hapo", "hapo-no-tools"), seeds=(0,), warmup_steps=10, steps=2,
                        eval_interval=2, eval_prompts=8, extra=small, reference="hapo-no-tools")
    env = run_compare(f"{out}/guess", "guess", ("dapo",), seeds=(0,), warmup_steps=10, steps=2, eval_interval=2,
                      eval_prompts=16, extra=small, reference="dapo")
    return tools, env


def test_compare_on_the_tool_and_environment_tasks(tmp_path):
    """`compare --task multiply`: the warm-up with tool examples, HAPO with the python tool (multi-turn
    rollouts, tool metrics in the rows and the table) and the arm without tools, from one warm-up.
    `compare --task guess` (the same process): the warm-up on games, an arm whose rewards are the
    environment's, its turns in the rows and the table."""
    s, env = run_ranks(1, tool_compare_worker, str(tmp_path), timeout=900)[0]
    hapo, floor = s["arms"]["hapo"], s["arms"]["hapo-no-tools"]
    assert len(hapo["tool_use_final"]) == 1 and "tool_use_final" not in floor
    rows = [json.loads(x) for x in (tmp_path / "cmp" / "seed0" / "hapo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2] and sum(m["tool_calls"] for m in rows) > 0  # the random-ish model calls
    assert all(m["turns_per_sample"] >= 1 and m["tool_timeouts"] == 0 for m in rows) and "eval_tool_use_rate" in rows[-1]
    floor_rows = [json.loads(x) for x in (tmp_path / "cmp" / "seed0" / "hapo-no-tools" / "metrics.jsonl").read_text().splitlines()]
    assert not any("tool_calls" in m for m in floor_rows)
    assert "tools: []" in (tmp_path / "cmp" / "seed0" / "hapo-no-tools" / "config.yaml").read_text()
    assert "- python" in (tmp_path / "cmp" / "seed0" / "hapo" / "config.yaml").read_text()
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert "tool use held-out" in table and "| hapo-no-tools |" in table

    rows = [json.loads(x) for x in (tmp_path / "guess" / "seed0" / "dapo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2] and not any("tool_calls" in m for m in rows)
    assert all(1 <= m["turns_per_sample"] <= 4 and m["reward_errors"] == m["reward_timeouts"] == 0 for m in rows)
    assert all(m["reward"] == m["accuracy"] for m in rows)  # the game's reward: 1 for a win, 0 otherwise
    assert 0 < rows[0]["rollout_accuracy"] < 1  # ten warm-up steps already win some games, not all
    assert len(env["arms"]["dapo"]["accuracy"]) == 1 and "turns held-out" in (tmp_path / "guess" / "table.md").read_text()


def test_engine_context_is_sized_from_the_run(tmp_path):
    """A model with 8192 positions (SmolLM2's) and 1 MiB of KV cache (1024 tokens): the engine's
    context is prompt + response, and when even that does not fit, the error names the setting."""
    from megatron_hapo.data.addition import build_tokenizer, qwen2_config, save_model_dir

    model = tmp_path / "long_context_model"
    save_model_dir(str(model), qwen2_config(max_positions=8192), build_tokenizer)
    extra = [f"model.hf_path={model}", f"rollout.kv_cache_memory_bytes={2**20}", "rollout.dynamic_sampling=false",
             "eval.at_end=false", "reward.workers=0"]
    # data.max_prompt_tokens=1024 (default) + 8 response tokens = 1040 tokens in blocks of 16, 1 KiB each
    error = run_ranks(1, strict_worker, str(tmp_path / "too_long"), extra, timeout=600)[0]
    assert "one sequence of 1032 tokens" in error and "data.max_prompt_tokens=1024" in error, error
    assert "rollout.kv_cache_memory_bytes=1048576 holds 1024 tokens: set rollout.kv_cache_memory_bytes=1064960" in error
    out = run_ranks(1, train_worker, str(tmp_path / "fits"), 1, [*extra, "data.max_prompt_tokens=64"], timeout=600)[0]
    assert out["error"] is None and len(out["history"]) == 1


def test_moe_recipe_fits_qwen3_30b_a3b():
    """examples/qwen3-30b-a3b/hapo.yaml validates for 32 ranks, and its layout fits Qwen3-30B-A3B's
    published config.json (the fields that matter here, written out: no hub on this machine)."""
    from pathlib import Path

    from megatron_hapo.models.hf_config import ModelSpec, check_layout

    cfg = Config.load(str(Path(__file__).parent.parent / "examples" / "qwen3-30b-a3b" / "hapo.yaml")).validate(world_size=32)
    p = cfg.parallel
    spec = ModelSpec.from_hf({
        "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "router_aux_loss_coef": 0.001, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 40960, "tie_word_embeddings": False})
    check_layout(spec, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                 ep=p.expert_model_parallel_size, etp=p.expert_tensor_parallel_size)
    assert p.sequence_parallel and spec.num_experts // p.expert_model_parallel_size == 16
    assert cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens <= spec.max_position_embeddings
    assert cfg.train.moe_aux_loss_coef == spec.moe_aux_loss_coef
    with pytest.raises(ValueError, match="expert_model_parallel_size=3 does not divide num_experts=128"):
        check_layout(spec, 2, 1, ep=3)
    with pytest.raises(ValueError, match="with expert_model_parallel_size=1"):  # the measured expert-TP trap
        check_layout(spec, 2, 1, ep=1, etp=1)


def test_study_arms_name_their_settings():
    """The arms of `compare` (no processes): the authors' released behaviour, the tool floor, the ablation."""
    from megatron_hapo.compare import _config, arm_overrides

    released = _config("unused", "chain", **arm_overrides("hapo-released")).algorithm
    assert (released.name, released.sign_mode, released.loss_stats) == ("hapo", "released", "micro_batch_current")
    assert released.adaptive_temperature and released.redistribute and released.adaptive_clip
    floor = _config("unused", "multiply", **arm_overrides("dapo-no-tools"))
    assert floor.rollout.tools == [] and not floor.rollout.dynamic_sampling and floor.algorithm.name == "dapo"
    assert _config("unused", "multiply", **arm_overrides("hapo")).rollout.tools == ["python"]
    with pytest.raises(ValueError, match="arm 'hapo-no-E'"):
        arm_overrides("hapo-no-E")


def bypass_worker(rank, world, root):
    """One step in each π_old mode from the same start: the same rollout, so the same statistics."""
    from megatron_hapo.trainer import Trainer

    out = {}
    for mode in ("trainer", "engine"):
        cfg = Config.load(None, [f"train.run_dir={root}/{mode}", "train.steps=1", "rollout.prompts_per_step=4",
                                 "rollout.samples_per_prompt=4", "train.mini_batch_prompts=4", "train.micro_batch_size=8",
                                 "rollout.dynamic_sampling=false", "log.progress=off", "eval.at_end=false",
                                 f"rollout.old_logprobs={mode}", "algorithm.rollout_correction=icepop"])
        trainer = Trainer(cfg)
        try:
            out[mode] = trainer.fit()[0]
        finally:
            trainer.close()
    return out


def test_old_logprobs_from_the_engine(tmp_path):
    """rollout.old_logprobs=engine: no old pass; the engine's T = 1 entropies give the trainer's
    statistics, and the first update's ratio (current policy at each token's recorded T over the
    engine's log-prob there) starts at 1, as the trainer's pass does at T = 1."""
    out = run_ranks(1, bypass_worker, str(tmp_path), timeout=600)[0]
    trainer, engine = out["trainer"], out["engine"]
    assert "logp_mismatch_at_t_mean" in trainer and "logp_mismatch_at_t_mean" not in engine
    assert trainer["response_tokens"] == engine["response_tokens"]  # the same rollout
    for k in ("entropy_q", "entropy_sigma", "entropy_z_pos", "entropy_z_neg"):
        assert engine[k] == pytest.approx(trainer[k], rel=1e-4, abs=1e-5), k
    assert engine["policy_drift"] < 1e-4 and trainer["policy_drift"] < 1e-4  # one update: π_θ = π_old before it
    assert engine["loss"] == pytest.approx(trainer["loss"], rel=1e-3, abs=1e-5)
    assert engine["rollout_correction_hit_frac"] == 0.0 and engine["rollout_correction_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert engine["time_old_pass"] < trainer["time_old_pass"]
