"""One typed config for a run: YAML file + `key.sub=value` command-line overrides, validated at start.

Parallelism uses Megatron's flag names; the algorithm section is `AlgorithmConfig` (every HAPO
switch of docs/HAPO.md). `Config.load(path, overrides)` → validated config; `config.dump()` is what
gets printed and saved with the run.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, List, Optional

import yaml

from .algorithms import AlgorithmConfig


@dataclasses.dataclass
class ModelConfig:
    hf_path: Optional[str] = None  # an HF folder (config, tokenizer, weights); None: the built-in tiny model
    load: Optional[str] = None  # a Megatron checkpoint (tools/convert_hf_to_megatron.py) to start from instead of hf_path's weights
    dtype: str = "float32"
    layer_spec: str = "auto"  # te (Transformer Engine, GPU) | local (torch modules) | auto: te on GPU, local on CPU


@dataclasses.dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    use_distributed_optimizer: bool = False
    sequence_parallel: bool = False  # with TP > 1 and the TE spec (GPU)
    inference_tensor_parallel_size: int = 1
    timeout_s: int = 1800  # training collectives (NCCL watchdog); a hung collective fails after this
    control_timeout_s: int = 14400  # control-plane exchanges over gloo that wait for the slowest rollout


@dataclasses.dataclass
class RolloutConfig:
    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    max_response_tokens: int = 8
    base_temperature: float = 1.0
    top_p: float = 1.0
    kv_cache_memory_bytes: int = 64 * 2**20  # CPU
    gpu_memory_utilization: float = 0.5  # GPU: the engine's share, colocated with training
    enable_sleep_mode: bool = False  # GPU: release the engine's memory while training
    dynamic_sampling: bool = True
    max_num_gen_batches: int = 10  # 0 = unlimited
    overlong_buffer: int = 0  # 0 = no overlong shaping
    overlong_penalty_factor: float = 1.0


@dataclasses.dataclass
class DataConfig:
    train: Any = "addition"  # a source or a list: file.jsonl|.json|.parquet, reasoning_gym:NAME, addition
    eval: Any = None  # the same kinds; None: the training source's held-out split where it has one
    prompt_key: str = "prompt"
    answer_key: str = "auto"  # dotted path; auto: reward_model.ground_truth, answer, ground_truth, solution
    apply_chat_template: bool = True
    max_prompt_tokens: int = 1024
    strict: bool = False  # a malformed row fails the run instead of being skipped and counted
    shuffle: bool = True
    reasoning_gym_size: int = 1000
    reasoning_gym_config: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RewardConfig:
    type: str = "auto"  # math | exact | reasoning_gym | code | module:Class; auto: by the data source
    workers: int = 2  # scoring processes; 0 = in the trainer's process (no hang protection)
    timeout_s: float = 10.0  # per response; a verifier past it gets the failure reward, counted
    correct: Optional[float] = None  # reward values; None: the verifier's (math: ±1, others 1/0)
    wrong: Optional[float] = None
    max_error_fraction: float = 1.0  # stop when the verifier errors on this share of a batch's responses (1.0: all)


@dataclasses.dataclass
class EvalConfig:
    interval: int = 0  # every K steps (0: never during training)
    before_train: bool = False
    at_end: bool = True
    num_prompts: int = 0  # 0: the whole eval set
    n: int = 1  # samples per prompt: mean@n and pass@n
    temperature: float = 0.0  # 0: greedy; the paper evaluates at 0.5 with top-p 0.7; adaptation is always off
    top_p: float = 1.0
    max_response_tokens: int = 0  # 0: rollout.max_response_tokens


@dataclasses.dataclass
class LogConfig:
    tensorboard: bool = True  # event files in run_dir/tensorboard
    progress: str = "auto"  # auto (on a terminal) | on | off
    token_samples: int = 2048  # (entropy, temperature) pairs kept per step for `megatron-hapo plot`


@dataclasses.dataclass
class TrainConfig:
    steps: int = 10
    mini_batch_prompts: int = 4
    micro_batch_size: int = 4
    lr: float = 1e-5
    lr_warmup_steps: int = 0
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    seed: int = 0
    run_dir: str = "runs/default"
    save_interval: int = 0  # 0 = only at the end
    keep_last: Optional[int] = 3
    resume: str = "auto"  # auto | none | a checkpoint folder


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    algorithm: Dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "hapo"})

    def algo(self) -> AlgorithmConfig:
        a = dict(self.algorithm)
        return AlgorithmConfig.preset(a.pop("name", "hapo"), **a)

    def validate(self, world_size: int = 1) -> "Config":
        p, r, t = self.parallel, self.rollout, self.train
        tp_pp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
        if world_size % tp_pp:
            raise ValueError(f"parallel: world size {world_size} is not divisible by tensor×pipeline = {tp_pp}")
        if world_size % p.inference_tensor_parallel_size:
            raise ValueError(f"parallel.inference_tensor_parallel_size={p.inference_tensor_parallel_size} does not divide "
                             f"the world size {world_size}")
        dp = world_size // tp_pp
        engines = world_size // p.inference_tensor_parallel_size
        if r.prompts_per_step % dp:
            raise ValueError(f"rollout.prompts_per_step={r.prompts_per_step} does not divide over {dp} data-parallel ranks")
        if r.prompts_per_step % engines:
            raise ValueError(f"rollout.prompts_per_step={r.prompts_per_step} does not divide over {engines} rollout engines "
                             f"(world {world_size} / inference_tensor_parallel_size {p.inference_tensor_parallel_size})")
        if t.mini_batch_prompts % dp:
            raise ValueError(f"train.mini_batch_prompts={t.mini_batch_prompts} does not divide over {dp} data-parallel ranks")
        if r.prompts_per_step % t.mini_batch_prompts:
            raise ValueError(f"train.mini_batch_prompts={t.mini_batch_prompts} does not divide "
                             f"rollout.prompts_per_step={r.prompts_per_step}")
        seqs = t.mini_batch_prompts * r.samples_per_prompt
        if seqs % dp or (seqs // dp) % t.micro_batch_size:
            raise ValueError(f"train.micro_batch_size={t.micro_batch_size} does not divide the {seqs // max(dp, 1)} "
                             f"sequences of a mini-batch on each of {dp} data-parallel ranks")
        if r.overlong_buffer > r.max_response_tokens:
            raise ValueError(f"rollout.overlong_buffer={r.overlong_buffer} exceeds rollout.max_response_tokens={r.max_response_tokens}")
        from .device import resolve_layer_spec

        spec = resolve_layer_spec(self.model.layer_spec)  # names the setting when it cannot work here
        if p.sequence_parallel and (spec != "te" or p.tensor_model_parallel_size == 1):
            raise ValueError("parallel.sequence_parallel: needs tensor_model_parallel_size > 1 and the Transformer Engine "
                             f"spec (model.layer_spec=te, GPU); got TP={p.tensor_model_parallel_size}, layer spec {spec}")
        if p.timeout_s < 60 or p.control_timeout_s < p.timeout_s:
            raise ValueError(f"parallel.timeout_s={p.timeout_s} must be ≥ 60 and parallel.control_timeout_s="
                             f"{p.control_timeout_s} at least as long")
        if t.steps < 1:
            raise ValueError(f"train.steps: must be ≥ 1, got {t.steps}")
        d, rw, e, lg = self.data, self.reward, self.eval, self.log
        from .data.datasets import as_sources

        for name, src in (("train", d.train), ("eval", d.eval)):
            for item in as_sources(src):
                if not isinstance(item, str):
                    raise ValueError(f"data.{name}: expected a path or source name, got {item!r}")
        if not d.train:
            raise ValueError("data.train: no training source")
        if d.max_prompt_tokens < 1:
            raise ValueError(f"data.max_prompt_tokens: must be ≥ 1, got {d.max_prompt_tokens}")
        from .rewards.registry import BUILTIN

        if rw.type != "auto" and rw.type not in BUILTIN and ":" not in rw.type:
            raise ValueError(f"reward.type: unknown verifier {rw.type!r}; expected auto, one of {list(BUILTIN)} or 'module:Class'")
        if not 0 < rw.max_error_fraction <= 1:
            raise ValueError(f"reward.max_error_fraction: must lie in (0, 1], got {rw.max_error_fraction}")
        if rw.workers < 0 or not rw.timeout_s > 0:
            raise ValueError(f"reward.workers must be ≥ 0 and reward.timeout_s positive, got {rw.workers}, {rw.timeout_s}")
        if e.interval < 0 or e.n < 1 or e.num_prompts < 0 or e.temperature < 0 or not 0 < e.top_p <= 1:
            raise ValueError(f"eval: need interval ≥ 0, n ≥ 1, num_prompts ≥ 0, temperature ≥ 0, 0 < top_p ≤ 1; got "
                             f"{e.interval}, {e.n}, {e.num_prompts}, {e.temperature}, {e.top_p}")
        if e.temperature == 0 and e.n > 1:
            raise ValueError(f"eval.n={e.n} with eval.temperature=0: greedy decoding gives n identical samples")
        if isinstance(lg.progress, bool):  # YAML 1.1 reads on/off as booleans
            lg.progress = "on" if lg.progress else "off"
        if lg.progress not in ("auto", "on", "off"):
            raise ValueError(f"log.progress: expected auto | on | off, got {lg.progress!r}")
        self.algo()  # validates the algorithm section, naming the field
        return self

    def dump(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)

    @classmethod
    def load(cls, path: Optional[str] = None, overrides: Optional[List[str]] = None) -> "Config":
        data: Dict[str, Any] = {}
        if path:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        for item in overrides or []:
            if "=" not in item:
                raise ValueError(f"override {item!r}: expected key.sub=value")
            key, value = item.split("=", 1)
            node = data
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            parsed = yaml.safe_load(value)
            if isinstance(parsed, str):  # YAML 1.1 reads "1e-4" as a string
                try:
                    parsed = float(parsed)
                except ValueError:
                    pass
            node[parts[-1]] = parsed
        return cls._from_dict(data)

    @classmethod
    def _from_dict(cls, data: Dict[str, Any]) -> "Config":
        kwargs = {}
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            if key not in hints:
                raise ValueError(f"config: unknown section {key!r}; expected one of {sorted(hints)}")
            if key == "algorithm":
                if not isinstance(value, dict):
                    raise ValueError("config.algorithm: expected a mapping")
                known = {f.name for f in dataclasses.fields(AlgorithmConfig)}
                bad = sorted(set(value) - known)
                if bad:
                    raise ValueError(f"config.algorithm: unknown settings {bad}")
                kwargs[key] = value
                continue
            section_cls = hints[key]
            fields = {f.name: f for f in dataclasses.fields(section_cls)}
            bad = sorted(set(value) - set(fields))
            if bad:
                raise ValueError(f"config.{key}: unknown settings {bad}; expected some of {sorted(fields)}")
            kwargs[key] = section_cls(**value)
        return cls(**kwargs)
