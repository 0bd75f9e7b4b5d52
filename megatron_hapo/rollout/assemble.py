"""What a rollout side needs, built the same way wherever the engines live: the run's model folder
read (tokenizer, architecture, data, stop tokens) and the engine with its reward pool and
collector. The colocated trainer builds both on every rank; with rollout.placement=separate the
trainer ranks build only the inputs (rollout/remote.py) and the engine ranks both (rollout/engine_rank.py)."""
from __future__ import annotations

import dataclasses

from ..data import PromptSampler
from ..data.datasets import default_reward_type, load_run_data
from ..models.hf_config import ModelSpec, stop_token_ids
from ..rewards import build_verifier, start_reward_pool
from .collect import Layout, RolloutCollector


@dataclasses.dataclass
class RunInputs:
    model_dir: str
    tokenizer: object
    spec: ModelSpec
    train_data: object
    eval_data: object
    sampler: PromptSampler
    stop_ids: tuple


def run_inputs(cfg, model_dir: str) -> RunInputs:
    """The tokenizer, the architecture, the train and eval data (and their sampler) and stop tokens of
    the run's model folder; a tokenizer larger than the model is refused."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    spec = ModelSpec.from_hf(model_dir)
    if len(tokenizer) > spec.vocab_size:
        raise ValueError(f"model.hf_path: the tokenizer has {len(tokenizer)} tokens, the model only {spec.vocab_size}")
    train_data, eval_data = load_run_data(cfg, tokenizer, spec.max_position_embeddings)
    sampler = PromptSampler(len(train_data), seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    return RunInputs(model_dir, tokenizer, spec, train_data, eval_data, sampler, stop_token_ids(tokenizer, model_dir))


def run_reward_type(cfg) -> str:
    """reward.type with auto resolved: the environment's rewards where the run has one, else by the data."""
    if cfg.reward.type != "auto":
        return cfg.reward.type
    return "environment" if cfg.rollout.environment else default_reward_type(cfg.data.train)


def rollout_side(cfg, inputs: RunInputs, layout: Layout, control):
    """(engine, reward pool, collector, sampling config) of this rank: its engine (with the run's
    tools), the reward pool on its engine's first rank, the collector over `control`."""
    from .engine import SamplingConfig, engine_for_run  # vLLM: imported once the process is set up
    from .tools import tools_for_run

    rw = cfg.reward
    kind = run_reward_type(cfg)
    verifier = build_verifier(kind, rw.correct, rw.wrong, rw.sandbox_limits()) if kind != "environment" else None
    rewards = start_reward_pool(verifier, rw.workers, rw.timeout_s, layout.engine_leader, control) if verifier else None
    engine = tools_for_run(cfg, engine_for_run(cfg, inputs.model_dir, inputs.spec), inputs.tokenizer,
                           rw.sandbox_limits())
    collector = RolloutCollector(
        engine, rewards, verifier.failure_reward if verifier else 0.0,
        lambda ids: inputs.tokenizer.batch_decode(ids, skip_special_tokens=True), layout, control, cfg.train.seed,
        rw.max_error_fraction, kind)
    return engine, rewards, collector, SamplingConfig.for_rollout(cfg.rollout, cfg.algorithm, inputs.stop_ids)
