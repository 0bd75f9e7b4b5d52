"""The typed config: each value coerced to its field's type and checked once, at load, under the
name the user wrote; the algorithm section resolved and dumped with every effective value; every
optimizer and layout field of the policy settable from the run's config."""
import dataclasses

import pytest
import yaml

from megatron_hapo.algorithms import AlgorithmConfig
from megatron_hapo.config import Config, ConfigError, OptimConfig


@pytest.mark.parametrize("override, match", [
    ("train.steps=abc", "train.steps: expected an integer, got 'abc'"),
    ("train.steps=2.5", "train.steps: expected an integer, got 2.5"),
    ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
    ("rollout.dynamic_sampling=maybe", "rollout.dynamic_sampling: expected true or false"),
    ("algorithm.tau=1.0", "algorithm.tau: must lie in \\[0, 1\\)"),
    ("rollout.top_p=0", "rollout.top_p: must lie in \\(0, 1\\]"),
    ("rollout.base_temperature=-1", "rollout.base_temperature: must be positive"),
    ("train.adam_beta2=1.5", "train.adam_beta2: must lie in \\[0, 1\\)"),
    ("train.min_lr=1", "train.min_lr: must lie in \\[0, lr="),
    ("model.dtype=fp16", "model.dtype: expected float32 \\| bfloat16"),
    ("parallel.virtual_pipeline_model_parallel_size=2", "virtual_pipeline_model_parallel_size: refused"),
    ("algorithm.name=ppo", "algorithm: unknown value 'ppo'"),
    ("algorithm.eps_high=-1", "algorithm.eps_high: must be non-negative"),
    ("eval=3", "config.eval: expected a mapping"),
    ("reward.sandbox.disk_gb=1", "config.reward.sandbox: unknown settings \\['disk_gb'\\]"),
    ("reward.sandbox.disk_mb=0", "reward.sandbox.disk_mb: must be positive, got 0"),
    ("reward.sandbox.wall_s=soon", "reward.sandbox.wall_s: expected a number, got 'soon'"),
    ("rollout.tools=[python,bash]", "rollout.tools: 'bash' is neither a built-in tool \\['calculator', 'python', 'search'\\]"),
    ("rollout.tools=[python,nopkg.tools:Search]", "rollout.tools: cannot import 'nopkg.tools:Search' \\(ModuleNotFoundError"),
    ("rollout.tools=[json:dumps]", "rollout.tools: 'json:dumps' is not a megatron_hapo Tool"),
    ("rollout.tools={python: 1}", "rollout.tools: expected a list"),
    ("rollout.tool_format=xml", "rollout.tool_format: expected auto \\| chat_template \\| tags"),
    ("rollout.tool_tags=[<a>,</a>]", "rollout.tool_tags: expected four non-empty strings"),
    ("rollout.tool_timeout_s=0", "rollout.tool_timeout_s: must be positive"),
    ("rollout.environment=maze", "rollout.environment: 'maze' is neither a built-in environment \\['guess'\\]"),
    ("rollout.environment=json:dumps", "rollout.environment: 'json:dumps' is not a subclass"),
    (("rollout.environment=guess", "rollout.environment_settings.max_guesess=3"),
     "rollout.environment_settings: 'guess' does not take \\['max_guesess'\\]"),
    ("rollout.environment_settings.size=3", "rollout.environment_settings: set without rollout.environment"),
    (("rollout.environment=guess", "rollout.routing_replay=true", "rollout.placement=separate", "rollout.engine_ranks=1",
      "rollout.max_staleness=1", "rollout.partial=true"), "rollout.partial: not with rollout.tools, rollout.environment"),
    ("reward.type=environment", "reward.type=environment: the run has no rollout.environment"),
    ("data.train=guess", "data.train=guess is the environment task: set rollout.environment=guess"),
])
def test_bad_values_fail_at_load_under_their_name(override, match):
    with pytest.raises(ConfigError, match=match):
        Config.load(None, [override] if isinstance(override, str) else list(override))


def test_tool_settings_take_lists_from_yaml_or_the_command_line():
    assert Config.load(None, ["rollout.tools=python"]).rollout.tools == ["python"]
    assert Config.load(None, ["rollout.tools=[python]"]).rollout.tools == ["python"]
    assert Config.load(None, ["rollout.tools=[]"]).rollout.tools == []
    assert Config.load(None, ["rollout.tools=python", "rollout.routing_replay=true"]).rollout.routing_replay  # turns merged


def test_values_take_their_fields_type():
    cfg = Config.load(None, ["train.run_dir=1e3", "train.steps=20", "train.lr=1e-4", "reward.correct=1",
                             "train.keep_last=none", "log.progress=off", "rollout.enable_sleep_mode=yes"])
    assert cfg.train.run_dir == "1e3" and cfg.train.steps == 20 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == 1e-4 and cfg.reward.correct == 1.0 and isinstance(cfg.reward.correct, float)
    assert cfg.train.keep_last is None and cfg.log.progress == "off" and cfg.rollout.enable_sleep_mode is True


def test_algorithm_section_is_resolved_and_dumped_in_full(tmp_path):
    cfg = Config.load(None, ["algorithm.name=dapo", "algorithm.eps_high=0.3"])
    assert isinstance(cfg.algorithm, AlgorithmConfig)
    assert cfg.algorithm == AlgorithmConfig.preset("dapo", eps_high=0.3)
    dumped = yaml.safe_load(cfg.dump())
    assert set(dumped["algorithm"]) == {f.name for f in dataclasses.fields(AlgorithmConfig)}
    assert dumped["algorithm"]["adaptive_temperature"] is False and dumped["algorithm"]["eps_high"] == 0.3
    (tmp_path / "run.yaml").write_text(cfg.dump())
    assert Config.load(str(tmp_path / "run.yaml")) == cfg  # what a run saves loads back to the same config
    grpo = Config.load(None, ["algorithm.name=grpo"]).algorithm
    assert grpo.agg == "seq-mean-token-mean" and grpo.eps_high == 0.2


def test_policy_config_comes_from_the_run_sections():
    from megatron_hapo.training.policy import PolicyConfig

    cfg = Config.load(None, ["train.adam_beta2=0.95", "train.adam_eps=1e-6", "train.min_lr=1e-7", "train.lr=1e-5",
                             "train.logprob_chunk_size=256", "parallel.use_distributed_optimizer=true",
                             "model.dtype=bfloat16", "train.micro_batch_size=2", "train.steps=3",
                             "rollout.prompts_per_step=8", "train.mini_batch_prompts=2"])
    pc = PolicyConfig.from_config(cfg)
    assert (pc.adam_beta2, pc.adam_eps, pc.min_lr, pc.lr, pc.logprob_chunk_size) == (0.95, 1e-6, 1e-7, 1e-5, 256)
    assert pc.use_distributed_optimizer and pc.dtype == "bfloat16" and pc.micro_batch_size == 2
    assert pc.train_steps == 3 * 4  # optimizer steps: 4 mini-batches per rollout step
    assert pc.seed == cfg.train.seed
    # one definition of the optimizer fields: the run's and the policy's defaults cannot drift apart
    optim = {f.name for f in dataclasses.fields(OptimConfig)}
    assert {n: getattr(PolicyConfig(), n) for n in optim} == {n: getattr(Config().train, n) for n in optim}


def test_sandbox_limits_come_from_the_reward_section():
    import yaml

    from megatron_hapo.rewards import SandboxLimits, build_verifier, sandbox_status

    cfg = Config.load(None, ["reward.sandbox.disk_mb=64", "reward.sandbox.wall_s=2"])
    limits = cfg.reward.sandbox_limits()
    assert limits == SandboxLimits(disk_mb=64, wall_s=2.0) and Config.load(None, []).reward.sandbox_limits() == SandboxLimits()
    assert Config.from_dict(yaml.safe_load(cfg.dump())).reward.sandbox_limits() == limits
    if sandbox_status()[0]:  # the code verifier refuses to start without its sandbox
        assert build_verifier("code", sandbox=limits).limits == limits


def test_config_reference_is_current_and_complete():
    """docs/CONFIG.md is what `megatron-hapo config --doc` generates from the typed config, and every
    setting has a doc comment (a new field without one fails here)."""
    import pathlib

    from megatron_hapo.config_doc import field_docs, reference, undocumented

    assert undocumented() == []
    path = pathlib.Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"
    assert path.read_text() == reference(), "docs/CONFIG.md is stale: run `megatron-hapo config --doc`"
    from megatron_hapo.config import RolloutConfig

    docs = field_docs(RolloutConfig)  # a comment block above a field is its doc, a trailing one too
    assert docs["enforce_eager"].startswith("GPU: false = CUDA graphs") and "generation cap" in docs["max_response_tokens"]
