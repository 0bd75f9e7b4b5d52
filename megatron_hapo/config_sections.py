"""The run config's sections, one dataclass each, with their own range checks (`check()`), and the error
every bad setting raises (`ConfigError`, naming the setting). `config.py` assembles them into `Config`
(loading, coercion, the checks that need the layout)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with the setting's name."""


def _need(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


@dataclasses.dataclass
class ModelConfig:
    hf_path: Optional[str] = None  # an HF folder (config, tokenizer, weights); None: the built-in addition model (demo)
    load: Optional[str] = None  # a Megatron checkpoint (tools/convert_hf_to_megatron.py) to start from instead of hf_path's weights
    dtype: str = "float32"  # float32 | bfloat16 (the usual choice on GPU): parameters, engine and activations
    layer_spec: str = "auto"  # te (Transformer Engine, GPU) | local (torch modules) | auto: te on GPU, local on CPU

    def check(self) -> None:
        _need(self.dtype in ("float32", "bfloat16"), "model.dtype", f"expected float32 | bfloat16, got {self.dtype!r}")
        _need(self.layer_spec in ("auto", "te", "local"), "model.layer_spec", f"expected auto | te | local, got {self.layer_spec!r}")


@dataclasses.dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1  # Megatron TP: each layer's matrices split over this many ranks
    pipeline_model_parallel_size: int = 1  # Megatron PP: the layers split into this many stages (1F1B schedule)
    virtual_pipeline_model_parallel_size: Optional[int] = None  # refused: see training/policy.py
    use_distributed_optimizer: bool = False  # shard the optimizer state over data-parallel ranks (Megatron's distributed optimizer)
    sequence_parallel: bool = False  # Megatron SP: activations outside attention/MLP split over TP (TP > 1, either spec; MoE with TP > 1 needs it)
    expert_model_parallel_size: int = 1  # MoE: experts split over EP ranks (EP divides the experts)
    expert_tensor_parallel_size: Optional[int] = None  # MoE: each expert split over ETP ranks; None = TP
    inference_tensor_parallel_size: int = 1  # TP of each vLLM engine (one engine per group of this many ranks); may differ from training TP
    timeout_s: int = 1800  # training collectives (NCCL watchdog); a hung collective fails after this
    control_timeout_s: int = 14400  # control-plane exchanges over gloo that wait for the slowest rollout

    def check(self) -> None:
        for f in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "inference_tensor_parallel_size",
                  "expert_model_parallel_size"):
            _need(getattr(self, f) >= 1, f"parallel.{f}", f"must be ≥ 1, got {getattr(self, f)}")
        _need(self.expert_tensor_parallel_size is None or self.expert_tensor_parallel_size >= 1,
              "parallel.expert_tensor_parallel_size", f"must be ≥ 1 or null, got {self.expert_tensor_parallel_size}")
        _need(not self.virtual_pipeline_model_parallel_size, "parallel.virtual_pipeline_model_parallel_size",
              "refused: over gloo the interleaved schedule's training forward does not match PP without interleaving, "
              "and it is not yet checked on GPUs")
        _need(self.timeout_s >= 60 and self.control_timeout_s >= self.timeout_s, "parallel.timeout_s",
              f"parallel.timeout_s={self.timeout_s} must be ≥ 60 and parallel.control_timeout_s={self.control_timeout_s} "
              "at least as long")


@dataclasses.dataclass
class RolloutConfig:
    prompts_per_step: int = 8  # prompts per RL step (kept ones, after dynamic sampling)
    samples_per_prompt: int = 4  # responses per prompt: the group size of the advantages
    max_response_tokens: int = 8  # generation cap per response
    base_temperature: float = 1.0  # T_base: the sampling temperature (HAPO A scales it per token)
    top_p: float = 1.0  # nucleus sampling at rollout
    kv_cache_memory_bytes: int = 64 * 2**20  # CPU
    gpu_memory_utilization: float = 0.5  # GPU: the engine's share, colocated with training
    enable_sleep_mode: bool = False  # GPU: release the engine's memory while training
    # GPU: false = CUDA graphs and vLLM's torch.compile for decoding (2-3x for small batches); true
    # until tools/gpu_selftest.py's CUDA-graphs check has passed on a GPU (the CPU backend is always eager)
    enforce_eager: bool = True
    # the temperature processor's statistics and scaling as two torch.compile'd kernels (3 reads and
    # 1 write of the logits a step instead of ~10 passes); false = the eager path (same numbers to
    # ~1e-5). Where the kernels cannot be built (no C++ compiler) the eager path is used, said once.
    fused_processor: bool = True
    # MoE: record the experts each token was routed to at rollout and replay them in the old pass and
    # the update (Megatron's routing replay): train/rollout routing mismatch cannot change which experts
    # a token trains. The engine then runs without prefix caching and (GPU) without CUDA graphs.
    routing_replay: bool = False
    dynamic_sampling: bool = True  # DAPO's dynamic sampling: drop groups whose rewards are all equal, generate more until the step is full
    max_num_gen_batches: int = 10  # 0 = unlimited
    overlong_buffer: int = 0  # 0 = no overlong shaping
    overlong_penalty_factor: float = 1.0  # DAPO's overlong shaping: the penalty reached at the cap
    # multi-turn tool use (rollout/tools.py): the tools the model may call mid-response ([] = single-turn):
    # built-in python (the call's program in the code sandbox: reward.sandbox's limits, tool_timeout_s wall
    # clock), calculator, search; or a user's Tool class by import path, "mypkg.tools:Search" (tool_api.py)
    tools: List[str] = dataclasses.field(default_factory=list)
    # each tool's settings by its name, passed to its constructor (e.g. {search: {path: docs.jsonl}})
    tool_settings: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    max_turns: int = 4  # model turns per response at most (a call that closes the last turn is not run)
    max_tool_output_tokens: int = 64  # a tool result longer than this is cut (and marked), in tokens
    tool_timeout_s: float = 5.0  # wall clock of one tool call; past it the call is killed and reported as timed out
    tool_workers: int = 4  # tool calls of one generation round run in parallel in this many sandboxes
    # multi-turn with an environment (rollout/env_api.py): a world or user that answers every model turn
    # (reset(row) -> first message, step(turn) -> (reply, done, reward)), one instance per trajectory; built-in
    # guess (the number-guessing game) or a user's Environment class, "mypkg.envs:Maze"; None = no environment.
    # Its reward is the run's (reward.type=auto → environment); steps run in tool_workers threads, each
    # within tool_timeout_s; a reply is cut to max_tool_output_tokens
    environment: Optional[str] = None
    environment_settings: Dict[str, Any] = dataclasses.field(default_factory=dict)  # the environment's constructor's keywords
    # chat_template: the Qwen <tool_call>{"name": ..., "arguments": {"code": ...}}</tool_call> form of the
    # tokenizer's template (rendered with tools=), an environment's replies as user turns; tags: tool_tags;
    # auto: chat_template where the template and tokenizer define <tool_call> … </tool_call> (with an
    # environment only: where the template marks a user turn), tags otherwise
    tool_format: str = "auto"
    # tags form: call open, call close, result open (an environment's reply too), result close; the call's close must be one token
    tool_tags: List[str] = dataclasses.field(default_factory=lambda: ["<python>", "</python>", "<output>", "</output>"])
    # π_old of the clip: trainer (a forward pass of the weights that sampled, at T = 1) | engine (no such
    # pass: the engine's recorded log-probs at each token's temperature are π_old and its recorded
    # entropies feed the statistics and h̃; the update then scores the current policy at those temperatures)
    old_logprobs: str = "trainer"
    # where the engines run: colocated (every rank trains and hosts a share of an engine, in turns) |
    # separate (the launch's last `engine_ranks` ranks host only engines, the others only train; one
    # torchrun/srun job; weights move over a process group after every update, rollouts come back)
    placement: str = "colocated"
    engine_ranks: int = 0  # separate: ranks that host engines (whole inference-TP groups); the rest train
    # separate: how many versions a rollout may lag the update that uses it. 0 = on policy (step k's
    # rollout under the weights of step k−1); 1 = one step off (step k+1's rollout runs while step k trains);
    # N: up to N steps ahead. Without partial rollouts the version of every step's rollout is fixed
    # (max(0, k−1−N)), so results do not depend on timing and a resume is bit-identical.
    max_staleness: int = 0
    # separate, max_staleness ≥ 1: rollouts stream group by group; a new version is applied between decoding
    # steps and the requests in flight continue under it (their cache recomputed), each token recording its version
    partial: bool = False
    # partial rollouts: wait = admit a prompt only while the trainer is at most max_staleness versions behind
    # it (no token ever too stale); drop = admit by version, drop (and count) groups with a token too stale
    stale: str = "wait"

    def check(self) -> None:
        for f in ("prompts_per_step", "samples_per_prompt", "max_response_tokens", "kv_cache_memory_bytes"):
            _need(getattr(self, f) >= 1, f"rollout.{f}", f"must be ≥ 1, got {getattr(self, f)}")
        _need(self.base_temperature > 0 and math.isfinite(self.base_temperature), "rollout.base_temperature",
              f"must be positive, got {self.base_temperature}")
        _need(0 < self.top_p <= 1, "rollout.top_p", f"must lie in (0, 1], got {self.top_p}")
        _need(0 < self.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization",
              f"must lie in (0, 1], got {self.gpu_memory_utilization}")
        _need(self.max_num_gen_batches >= 0, "rollout.max_num_gen_batches", f"must be ≥ 0, got {self.max_num_gen_batches}")
        _need(0 <= self.overlong_buffer <= self.max_response_tokens, "rollout.overlong_buffer",
              f"rollout.overlong_buffer={self.overlong_buffer} exceeds rollout.max_response_tokens={self.max_response_tokens}"
              if self.overlong_buffer > 0 else f"must be ≥ 0, got {self.overlong_buffer}")
        _need(self.overlong_penalty_factor >= 0, "rollout.overlong_penalty_factor",
              f"must be ≥ 0, got {self.overlong_penalty_factor}")
        if self.tools:  # resolved here, at load: a typo or an import error is named before any process starts
            from .rollout.tool_api import schemas

            try:
                names = [t["function"]["name"] for t in schemas(self.tools)]
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            unknown = sorted(set(self.tool_settings) - set(names))
            _need(not unknown, "rollout.tool_settings", f"settings for tools not in rollout.tools: {unknown}")
        else:
            _need(not self.tool_settings, "rollout.tool_settings", "set without rollout.tools")
        if self.environment is not None:  # resolved, and its settings bound to its constructor, at load
            import inspect

            from .rollout.env_api import resolve

            try:
                cls = resolve(self.environment)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            try:
                inspect.signature(cls).bind(**self.environment_settings)
            except TypeError as exc:
                raise ConfigError(f"rollout.environment_settings: {self.environment!r} does not take "
                                  f"{sorted(self.environment_settings)}: {exc}") from None
        else:
            _need(not self.environment_settings, "rollout.environment_settings", "set without rollout.environment")
        _need(self.max_turns >= 1 and self.max_tool_output_tokens >= 1 and self.tool_workers >= 1, "rollout.max_turns",
              f"rollout.max_turns, max_tool_output_tokens and tool_workers must be ≥ 1, got {self.max_turns}, "
              f"{self.max_tool_output_tokens}, {self.tool_workers}")
        _need(self.tool_timeout_s > 0, "rollout.tool_timeout_s", f"must be positive, got {self.tool_timeout_s}")
        _need(self.tool_format in ("auto", "chat_template", "tags"), "rollout.tool_format",
              f"expected auto | chat_template | tags, got {self.tool_format!r}")
        _need(len(self.tool_tags) == 4 and all(isinstance(t, str) and t for t in self.tool_tags), "rollout.tool_tags",
              f"expected four non-empty strings (call open, call close, result open, result close), got {self.tool_tags!r}")
        _need(self.old_logprobs in ("trainer", "engine"), "rollout.old_logprobs",
              f"expected trainer | engine, got {self.old_logprobs!r}")
        _need(self.placement in ("colocated", "separate"), "rollout.placement",
              f"expected colocated | separate, got {self.placement!r}")
        _need(self.placement == "colocated" or self.engine_ranks >= 1, "rollout.engine_ranks",
              f"rollout.placement=separate needs rollout.engine_ranks ≥ 1 (the ranks that host engines), got {self.engine_ranks}")
        _need(self.max_staleness >= 0, "rollout.max_staleness", f"must be ≥ 0, got {self.max_staleness}")
        _need(self.max_staleness == 0 or self.placement == "separate", "rollout.max_staleness",
              f"{self.max_staleness} needs rollout.placement=separate (colocated engines and training take turns on "
              f"the same ranks, so there is nothing to overlap)")
        _need(not self.partial or self.max_staleness >= 1, "rollout.partial",
              "needs rollout.max_staleness ≥ 1 (a version arriving mid-rollout is a version the rollout lags)")
        _need(self.stale in ("drop", "wait"), "rollout.stale", f"expected drop | wait, got {self.stale!r}")
        _need(not (self.partial and (self.tools or self.environment or self.routing_replay)), "rollout.partial",
              "not with rollout.tools, rollout.environment or rollout.routing_replay yet (a continued request would "
              "split a tool or environment turn or the routing record)")


@dataclasses.dataclass
class DataConfig:
    train: Any = "addition"  # a source or a list: file.jsonl|.json|.parquet, reasoning_gym:NAME, addition
    eval: Any = None  # the same kinds; None: the training source's held-out split where it has one
    prompt_key: str = "prompt"  # the row field holding the prompt (text or chat messages)
    answer_key: str = "auto"  # dotted path; auto: reward_model.ground_truth, answer, ground_truth, solution
    apply_chat_template: bool = True  # render prompts with the tokenizer's chat template where it has one
    max_prompt_tokens: int = 1024  # longer prompts are skipped and counted (or fail the run with strict)
    strict: bool = False  # a malformed row fails the run instead of being skipped and counted
    shuffle: bool = True  # a new permutation of the training rows every epoch (seeded)
    reasoning_gym_size: int = 1000  # rows generated per reasoning_gym source
    reasoning_gym_config: Dict[str, Any] = dataclasses.field(default_factory=dict)  # the generators' own settings, passed through

    def check(self) -> None:
        from .data.datasets import as_sources

        _need(bool(self.train), "data.train", "no training source")
        for name, src in (("train", self.train), ("eval", self.eval)):
            for item in as_sources(src):
                _need(isinstance(item, str), f"data.{name}", f"expected a path or source name, got {item!r}")
        _need(self.max_prompt_tokens >= 1, "data.max_prompt_tokens", f"must be ≥ 1, got {self.max_prompt_tokens}")
        _need(self.reasoning_gym_size >= 1, "data.reasoning_gym_size", f"must be ≥ 1, got {self.reasoning_gym_size}")


@dataclasses.dataclass
class RewardConfig:
    # math | exact | reasoning_gym | code | module:Class | environment (rollout.environment's own rewards);
    # auto: environment with one, else by the data source
    type: str = "auto"
    workers: int = 2  # scoring processes; 0 = in the trainer's process (no hang protection)
    timeout_s: float = 10.0  # per response; a verifier past it gets the failure reward, counted
    correct: Optional[float] = None  # reward values; None: the verifier's (math: ±1, others 1/0)
    wrong: Optional[float] = None  # the reward of a wrong response; None: the verifier's
    max_error_fraction: float = 1.0  # stop when the verifier errors on this share of a batch's responses (1.0: all)
    sandbox: Dict[str, Any] = dataclasses.field(default_factory=dict)  # code: SandboxLimits fields (disk_mb, wall_s, ...)

    def sandbox_limits(self):
        """The code sandbox's limits: SandboxLimits' defaults with `reward.sandbox`'s values."""
        from .rewards.sandbox import SandboxLimits

        from .config import _coerce_fields  # the loader's coercion, for this nested section

        fields = _coerce_fields(SandboxLimits, self.sandbox, "reward.sandbox", {})
        for k, v in fields.items():
            _need(v > 0, f"reward.sandbox.{k}", f"must be positive, got {v}")
        return SandboxLimits(**fields)

    def check(self) -> None:
        from .rewards.registry import BUILTIN

        _need(self.type in ("auto", "environment") or self.type in BUILTIN or ":" in self.type, "reward.type",
              f"unknown verifier {self.type!r}; expected auto, environment, one of {list(BUILTIN)} or 'module:Class'")
        _need(0 < self.max_error_fraction <= 1, "reward.max_error_fraction", f"must lie in (0, 1], got {self.max_error_fraction}")
        self.sandbox_limits()
        _need(self.workers >= 0 and self.timeout_s > 0, "reward.workers",
              f"reward.workers must be ≥ 0 and reward.timeout_s positive, got {self.workers}, {self.timeout_s}")


@dataclasses.dataclass
class EvalConfig:
    interval: int = 0  # every K steps (0: never during training)
    before_train: bool = False  # evaluate at step 0
    at_end: bool = True  # evaluate after the last step
    num_prompts: int = 0  # 0: the whole eval set
    final_num_prompts: Optional[int] = None  # the evaluation after the last step (null: num_prompts; 0: the whole set)
    n: int = 1  # samples per prompt: mean@n and pass@n
    temperature: float = 0.0  # 0: greedy; the paper evaluates at 0.5 with top-p 0.7; adaptation is always off
    top_p: float = 1.0  # nucleus sampling at evaluation
    max_response_tokens: int = 0  # 0: rollout.max_response_tokens

    def check(self) -> None:
        _need(self.interval >= 0 and self.n >= 1 and self.num_prompts >= 0 and self.temperature >= 0
              and 0 < self.top_p <= 1 and self.max_response_tokens >= 0, "eval",
              f"need interval ≥ 0, n ≥ 1, num_prompts ≥ 0, temperature ≥ 0, 0 < top_p ≤ 1, max_response_tokens ≥ 0; "
              f"got {self.interval}, {self.n}, {self.num_prompts}, {self.temperature}, {self.top_p}, {self.max_response_tokens}")
        _need(self.final_num_prompts is None or self.final_num_prompts >= 0, "eval.final_num_prompts",
              f"must be ≥ 0 or null, got {self.final_num_prompts}")
        _need(not (self.temperature == 0 and self.n > 1), "eval.n",
              f"eval.n={self.n} with eval.temperature=0: greedy decoding gives n identical samples")


@dataclasses.dataclass
class LogConfig:
    tensorboard: bool = True  # event files in run_dir/tensorboard
    progress: str = "auto"  # auto (on a terminal) | on | off
    token_samples: int = 2048  # (entropy, temperature) pairs kept per step for `megatron-hapo plot`
    verbose: bool = False  # show the third-party warnings known to be harmless (megatron_hapo/quiet.py), filtered by default

    def check(self) -> None:
        _need(self.progress in ("auto", "on", "off"), "log.progress", f"expected auto | on | off, got {self.progress!r}")
        _need(self.token_samples >= 0, "log.token_samples", f"must be ≥ 0, got {self.token_samples}")


@dataclasses.dataclass
class OptimConfig:
    """The optimizer and LR schedule: one definition, read from `train.*` by the run and used as
    is by `training.policy.PolicyConfig` (which extends it)."""

    lr: float = 1e-5  # the peak learning rate (Adam)
    min_lr: Optional[float] = None  # None: lr (a constant schedule after the warm-up)
    lr_warmup_steps: int = 0  # in lr_warmup_unit
    # optimizer_steps: the LR schedule advances every optimizer step (mini-batch), the first at lr/W;
    # rollout_steps: once per rollout step, as the authors' verl trainer did (10 rollout steps = 160
    # optimizer steps at 16 mini-batches; every update of the first rollout step at lr 0)
    lr_warmup_unit: str = "optimizer_steps"
    weight_decay: float = 0.1  # decoupled weight decay (AdamW)
    adam_beta1: float = 0.9  # Adam β1
    adam_beta2: float = 0.999  # Adam β2
    adam_eps: float = 1e-8  # Adam ε
    clip_grad: float = 1.0  # gradient-norm clipping (0: none)

    def check_optim(self, section: str) -> None:
        _need(self.lr > 0, f"{section}.lr", f"must be positive, got {self.lr}")
        _need(self.min_lr is None or 0 <= self.min_lr <= self.lr, f"{section}.min_lr",
              f"must lie in [0, lr={self.lr}], got {self.min_lr}")
        _need(self.lr_warmup_steps >= 0, f"{section}.lr_warmup_steps", f"must be ≥ 0, got {self.lr_warmup_steps}")
        _need(self.lr_warmup_unit in ("optimizer_steps", "rollout_steps"), f"{section}.lr_warmup_unit",
              f"expected optimizer_steps | rollout_steps, got {self.lr_warmup_unit!r}")
        _need(self.weight_decay >= 0, f"{section}.weight_decay", f"must be ≥ 0, got {self.weight_decay}")
        for f in ("adam_beta1", "adam_beta2"):
            _need(0 <= getattr(self, f) < 1, f"{section}.{f}", f"must lie in [0, 1), got {getattr(self, f)}")
        _need(self.adam_eps > 0, f"{section}.adam_eps", f"must be positive, got {self.adam_eps}")
        _need(self.clip_grad >= 0, f"{section}.clip_grad", f"must be ≥ 0 (0: no clipping), got {self.clip_grad}")


@dataclasses.dataclass
class TrainConfig(OptimConfig):
    steps: int = 10  # RL steps to train to (a resumed run continues to this step)
    mini_batch_prompts: int = 4  # prompts per optimizer step: a step's rollout gives prompts_per_step / this updates
    micro_batch_size: int = 4  # sequences per micro-batch (padded rows; unused with max_tokens_per_micro_batch)
    # > 0: token-budget micro-batches (verl's dynamic batch size) of packed whole sequences, at most
    # this many tokens each (a longer sequence alone); micro_batch_size is then unused
    max_tokens_per_micro_batch: int = 0
    logprob_chunk_size: Optional[int] = 1024  # positions per chunk of the vocab-parallel log-prob pass (memory)
    # MoE: the load-balancing loss coefficient (null = the model config's router_aux_loss_coef) and
    # the router z-loss coefficient (0 = off), added to the objective by Megatron's MoE layers
    moe_aux_loss_coef: Optional[float] = None
    moe_z_loss_coef: float = 0.0  # MoE: the router z-loss coefficient (0: off)
    seed: int = 0  # data order, sampling seeds and Megatron's initialisation
    run_dir: str = "runs/default"  # where metrics, checkpoints, TensorBoard events and config.yaml go
    save_interval: int = 0  # 0 = only at the end
    keep_last: Optional[int] = 3  # checkpoints kept (null: all)
    resume: str = "auto"  # auto | none | a checkpoint folder

    def check(self) -> None:
        self.check_optim("train")
        _need(self.steps >= 1, "train.steps", f"must be ≥ 1, got {self.steps}")
        for f in ("mini_batch_prompts", "micro_batch_size"):
            _need(getattr(self, f) >= 1, f"train.{f}", f"must be ≥ 1, got {getattr(self, f)}")
        _need(self.max_tokens_per_micro_batch >= 0, "train.max_tokens_per_micro_batch",
              f"must be ≥ 0 (0: padded micro-batches of micro_batch_size), got {self.max_tokens_per_micro_batch}")
        _need(self.logprob_chunk_size is None or self.logprob_chunk_size >= 1, "train.logprob_chunk_size",
              f"must be ≥ 1 or null, got {self.logprob_chunk_size}")
        _need(self.moe_aux_loss_coef is None or self.moe_aux_loss_coef >= 0, "train.moe_aux_loss_coef",
              f"must be ≥ 0 or null, got {self.moe_aux_loss_coef}")
        _need(self.moe_z_loss_coef >= 0, "train.moe_z_loss_coef", f"must be ≥ 0, got {self.moe_z_loss_coef}")
        _need(self.save_interval >= 0, "train.save_interval", f"must be ≥ 0, got {self.save_interval}")
        _need(self.keep_last is None or self.keep_last >= 1, "train.keep_last", f"must be ≥ 1 or null, got {self.keep_last}")


SECTIONS = ("model", "parallel", "rollout", "train", "data", "reward", "eval", "log", "algorithm")
