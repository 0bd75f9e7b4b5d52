"""One typed config for a run: YAML file + `key.sub=value` command-line overrides.

Every section is a dataclass; `Config.load(path, overrides)` coerces each value to its field's
type and checks its range once, under the name the user wrote (`train.steps: expected an integer,
got 'abc'`); `Config.validate(world_size)` adds the checks that need the layout. The algorithm
section is the resolved `AlgorithmConfig` (a preset by `name`, then the user's overrides), so
`config.dump()`, what is printed, saved with the run and stored in checkpoints, holds every
effective value. Parallelism uses Megatron's flag names.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, List, Optional

import yaml

from .algorithms import AlgorithmConfig
from .device import resolve_layer_spec


from .config_sections import (  # noqa: F401  (the sections, re-exported: `from megatron_hapo.config import RolloutConfig`)
    SECTIONS, ConfigError, DataConfig, EvalConfig, LogConfig, ModelConfig, OptimConfig, ParallelConfig, RewardConfig,
    RolloutConfig, TrainConfig)



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
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)

    def check(self) -> "Config":
        """Every section's own ranges (run by `load`; `validate` runs it again for configs built in code)."""
        for name in SECTIONS[:-1]:
            getattr(self, name).check()
        if self.reward.type == "environment" and not self.rollout.environment:
            raise ConfigError("reward.type=environment: the run has no rollout.environment to give rewards")
        from .data.datasets import as_sources, source_kind

        if not self.rollout.environment and any(source_kind(str(s)) == "guess" for s in as_sources(self.data.train)):
            raise ConfigError("data.train=guess is the environment task: set rollout.environment=guess")
        return self

    def validate(self, world_size: int = 1) -> "Config":
        """The checks that need the layout (world size), after each section's own."""
        self.check()
        p, r, t = self.parallel, self.rollout, self.train
        tp_pp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
        if world_size % tp_pp:
            raise ConfigError(f"parallel: world size {world_size} is not divisible by tensor×pipeline = {tp_pp}")
        ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size or p.tensor_model_parallel_size
        if world_size % (ep * etp * p.pipeline_model_parallel_size):
            raise ConfigError(f"parallel.expert_model_parallel_size={ep}: world size {world_size} is not divisible by "
                              f"expert-tensor × expert × pipeline = {etp} × {ep} × {p.pipeline_model_parallel_size}")
        if world_size % p.inference_tensor_parallel_size and r.placement == "colocated":
            raise ConfigError(f"parallel.inference_tensor_parallel_size={p.inference_tensor_parallel_size} does not divide "
                              f"the world size {world_size}")
        dp = world_size // tp_pp
        engines = world_size // p.inference_tensor_parallel_size
        if r.placement == "separate":
            if r.engine_ranks % p.inference_tensor_parallel_size:
                raise ConfigError(f"rollout.engine_ranks={r.engine_ranks} is not a multiple of "
                                  f"parallel.inference_tensor_parallel_size={p.inference_tensor_parallel_size}")
            engines = r.engine_ranks // p.inference_tensor_parallel_size
        if r.prompts_per_step % dp:
            raise ConfigError(f"rollout.prompts_per_step={r.prompts_per_step} does not divide over {dp} data-parallel ranks")
        if r.prompts_per_step % engines:
            raise ConfigError(f"rollout.prompts_per_step={r.prompts_per_step} does not divide over {engines} rollout "
                              f"engines (world {world_size} / inference_tensor_parallel_size {p.inference_tensor_parallel_size})")
        if t.mini_batch_prompts % dp:
            raise ConfigError(f"train.mini_batch_prompts={t.mini_batch_prompts} does not divide over {dp} data-parallel ranks")
        if r.prompts_per_step % t.mini_batch_prompts:
            raise ConfigError(f"train.mini_batch_prompts={t.mini_batch_prompts} does not divide "
                              f"rollout.prompts_per_step={r.prompts_per_step}")
        seqs = t.mini_batch_prompts * r.samples_per_prompt
        if seqs % dp or ((seqs // dp) % t.micro_batch_size and not t.max_tokens_per_micro_batch):
            raise ConfigError(f"train.micro_batch_size={t.micro_batch_size} does not divide the {seqs // max(dp, 1)} "
                              f"sequences of a mini-batch on each of {dp} data-parallel ranks")
        resolve_layer_spec(self.model.layer_spec)  # names the setting when it cannot work here
        if p.sequence_parallel and p.tensor_model_parallel_size == 1:
            raise ConfigError("parallel.sequence_parallel: needs tensor_model_parallel_size > 1; got TP="
                              f"{p.tensor_model_parallel_size}")
        return self

    def validate_launch(self, launch_world: int) -> "Config":
        """The placement against the launch's world (torchrun/srun's WORLD_SIZE), before any process group:
        separate placement's engine ranks (whole inference-TP groups, at least one rank left to train, the
        prompts divided over the engines, one engine for partial rollouts), then `validate` at the
        trainers' world."""
        self.check()
        r, itp = self.rollout, self.parallel.inference_tensor_parallel_size
        if r.placement != "separate":
            return self.validate(launch_world)
        if not 1 <= r.engine_ranks < launch_world:
            raise ConfigError(f"rollout.engine_ranks={r.engine_ranks}: separate placement needs at least one engine rank "
                              f"and one trainer rank among the launch's {launch_world} (torchrun --nproc-per-node × nodes)")
        engines = r.engine_ranks // itp  # whole inference-TP groups: `validate` below refuses a remainder
        if r.partial and engines > 1:
            raise ConfigError(f"rollout.partial: one engine only for now (rollout.engine_ranks={r.engine_ranks} with "
                              f"parallel.inference_tensor_parallel_size={itp} makes {engines})")
        return self.validate(launch_world - r.engine_ranks)

    def optimizer_steps(self) -> int:
        """Optimizer steps in the whole run (one per mini-batch)."""
        return self.train.steps * (self.rollout.prompts_per_step // self.train.mini_batch_prompts)

    def dump(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)

    @classmethod
    def load(cls, path: Optional[str] = None, overrides: Optional[List[str]] = None) -> "Config":
        data: Dict[str, Any] = {}
        if path:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
        raw: Dict[str, str] = {}  # the override's text, for string fields ("train.run_dir=1e3" stays "1e3")
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key.sub=value")
            key, value = item.split("=", 1)
            parts = key.split(".")
            node = data
            for part in parts[:-1]:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {item!r}: {part} is not a section")
            node[parts[-1]] = yaml.safe_load(value)
            raw[key] = value
        return cls.from_dict(data, raw)

    @classmethod
    def from_dict(cls, data: Dict[str, Any], raw: Optional[Dict[str, str]] = None) -> "Config":
        raw = raw or {}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in data.items():
            if key not in hints:
                raise ConfigError(f"config: unknown section {key!r}; expected one of {list(SECTIONS)}")
            if not isinstance(value, dict):
                raise ConfigError(f"config.{key}: expected a mapping, got {value!r}")
            if key == "algorithm":
                kwargs[key] = _algorithm(value, raw)
            else:
                kwargs[key] = hints[key](**_coerce_fields(hints[key], value, key, raw))
        return cls(**kwargs).check()


def _algorithm(value: Dict[str, Any], raw: Dict[str, str]) -> AlgorithmConfig:
    """A preset by name, then the user's values (a dumped config, with every field, loads back the same)."""
    value = dict(value)
    name = _coerce(value.pop("name", "hapo"), str, "algorithm.name", raw.get("algorithm.name"))
    fields = _coerce_fields(AlgorithmConfig, value, "algorithm", raw)
    try:
        return AlgorithmConfig.preset(name, **fields)
    except ValueError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith("algorithm") else f"algorithm: {msg}") from None


def _coerce_fields(section_cls, values: Dict[str, Any], section: str, raw: Dict[str, str]) -> Dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    names = [f.name for f in dataclasses.fields(section_cls)]
    bad = sorted(set(values) - set(names))
    if bad:
        raise ConfigError(f"config.{section}: unknown settings {bad}; expected some of {sorted(names)}")
    return {k: _coerce(v, hints[k], f"{section}.{k}", raw.get(f"{section}.{k}")) for k, v in values.items()}


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(value: Any, hint: Any, name: str, raw: Optional[str] = None) -> Any:
    """`value` as the field's type, or a ConfigError naming the field."""
    if hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if origin in (list, List):  # a YAML list, or one comma-separated string on the command line
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if value is None:
            value = []
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(v, args[0], name) for v in value] if args else value
    if origin in (dict, Dict) or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return value
    if hint is str:
        if raw is not None:
            return raw
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans (log.progress: off)
            return "on" if value else "off"
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in _TRUE + _FALSE:
            return str(value).strip().lower() in _TRUE
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
            if f.is_integer():
                return int(f)
        if isinstance(value, int):
            return value
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    return value
