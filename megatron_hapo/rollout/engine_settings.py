"""What a rollout engine is asked for and what it answers, apart from vLLM itself: the sampling settings
(`SamplingConfig`), one response with its exact per-token records (`Response`, `token_records`), the
executor arguments of an engine's placement, and its sizing from the run (context length, KV cache
bytes and the advice when they do not fit). `rollout/engine.py` re-exports them."""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence, Tuple

import torch

from .. import device as dev
from ..algorithms.entropy import SIGN_MODES


TOOL_TURN_OVERHEAD = 32  # a tool turn's tokens around its output (the chat template's tool message, the tags)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_tokens: int
    base_temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    adaptive: bool = True  # HAPO A; False: T_base everywhere (DAPO, GRPO, evaluation)
    tau: float = 0.05
    sign_mode: str = "signed"
    stop_token_ids: Tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"sampling.max_tokens: must be ≥ 1, got {self.max_tokens}")
        if not (self.base_temperature > 0 and math.isfinite(self.base_temperature)):
            raise ValueError(f"sampling.base_temperature: must be positive, got {self.base_temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p: must lie in (0, 1], got {self.top_p}")
        if not 0 <= self.tau < 1:
            raise ValueError(f"sampling.tau: must lie in [0, 1), got {self.tau}")
        if self.sign_mode not in SIGN_MODES:
            raise ValueError(f"sampling.sign_mode: unknown value {self.sign_mode!r}")

    @classmethod
    def for_rollout(cls, rollout, algo, stop_token_ids) -> "SamplingConfig":
        """Training rollouts: rollout.* settings, HAPO's temperature adaptation as the algorithm says."""
        return cls(max_tokens=rollout.max_response_tokens, base_temperature=rollout.base_temperature, top_p=rollout.top_p,
                   adaptive=algo.adaptive_temperature, tau=algo.tau, sign_mode=algo.sign_mode,
                   stop_token_ids=tuple(stop_token_ids))

    @classmethod
    def for_eval(cls, ev, rollout_max_tokens: int, stop_token_ids) -> "SamplingConfig":
        """Evaluation: eval.* settings, no adaptation; temperature 0 means greedy (top-k 1)."""
        return cls(max_tokens=ev.max_response_tokens or rollout_max_tokens, base_temperature=ev.temperature or 1.0,
                   top_p=ev.top_p, top_k=1 if ev.temperature == 0 else 0, adaptive=False,
                   stop_token_ids=tuple(stop_token_ids))


@dataclasses.dataclass
class Response:
    """One generated response and, per generated token, what the engine did."""

    prompt_index: int
    sample_index: int
    token_ids: List[int]
    temperatures: List[float]
    entropies: List[float]  # of the raw (T = 1) distribution
    logprobs: List[float]  # under the distribution sampled from (at its temperature)
    logprobs_t1: List[float]  # at T = 1
    finish_reason: Optional[str]
    error: Optional[str] = None
    routing: Optional[object] = None  # routing replay: experts [layers, prompt + response − 1, top-k] (numpy)
    # multi-turn (rollout/tools.py): per token, True where the model sampled it (False: a tool's result);
    # where the model's last turn starts (what the verifier scores); (tool calls, errors, timeouts, turns)
    model_mask: Optional[List[bool]] = None
    answer_start: int = 0
    tools: Optional[Tuple[int, ...]] = None  # (turns,) with an environment and no tools
    versions: Optional[List[int]] = None  # separate placement, partial rollouts: per token, the weight version sampled under
    env: Optional[object] = None  # rollout.environment: the episode's reward (rewards.RewardResult), on the rank that stepped it

    @property
    def length(self) -> int:
        return len(self.token_ids)


def token_records(raw_logprobs: Sequence[float], record: dict) -> Tuple[List[float], List[float], List[float], List[float]]:
    """Per generated token (temperature, T = 1 entropy, log-prob at its temperature, log-prob at T = 1)
    from vLLM's raw log-probs and the temperature processor's record {position: (T, H, log Z_1, log Z_T)}."""
    temps, ents, lp, lp1 = [], [], [], []
    for pos, raw in enumerate(raw_logprobs):
        if pos not in record:
            raise RuntimeError(f"temperature processor kept no record for token {pos} of a response")
        t, h, lz1, lzt = record[pos]
        temps.append(t)
        ents.append(h)
        lp1.append(raw)
        lp.append((raw + lz1) / t - lzt)
    return temps, ents, lp, lp1


def engine_placement(tensor_parallel_size: int, distributed: bool, gpu: bool) -> dict:
    """vLLM executor arguments for one colocated engine (see the module docstring)."""
    if tensor_parallel_size < 1:
        raise ValueError(f"inference tensor_parallel_size: must be ≥ 1, got {tensor_parallel_size}")
    if not distributed:
        if tensor_parallel_size > 1:
            raise ValueError("inference tensor_parallel_size > 1 needs torch.distributed (launch with torchrun)")
        return {"tensor_parallel_size": 1}  # a standalone engine: vLLM's single-process executor
    kwargs = {"tensor_parallel_size": tensor_parallel_size, "distributed_executor_backend": "external_launcher"}
    if tensor_parallel_size > 1 and gpu:
        # vLLM's custom all-reduce allocates IPC buffers per TP group, which colocated engines and
        # sleep mode do not survive; NCCL all-reduce (vLLM's fallback) is safe.
        kwargs["disable_custom_all_reduce"] = True
    return kwargs


def run_context_length(cfg, max_positions: int) -> int:
    """The engine's max_model_len from the run, not the model: the longest prompt plus the longest
    response it will be asked for (training or evaluation), with tools the tool turns too (each at
    most rollout.max_tool_output_tokens + TOOL_TURN_OVERHEAD tokens), capped by the model's positions."""
    r = cfg.rollout
    response = max(r.max_response_tokens, cfg.eval.max_response_tokens)
    tools = (r.max_turns - 1) * (r.max_tool_output_tokens + TOOL_TURN_OVERHEAD) if r.tools or r.environment else 0
    return min(max_positions, cfg.data.max_prompt_tokens + response + tools)


def kv_bytes_per_token(spec, dtype: str) -> int:
    """KV cache bytes of one token of context over all layers (keys and values)."""
    size = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * size


def kv_cache_advice(cfg, spec, max_model_len: int, block: int = 16) -> str:
    """What to change when the engine's KV cache cannot hold one sequence of max_model_len tokens."""
    per_token = kv_bytes_per_token(spec, cfg.model.dtype)
    need = -(-max_model_len // block) * block * per_token
    r, d = cfg.rollout, cfg.data
    sizing = (f"the rollout engine needs {need / 2**20:.1f} MiB of KV cache for one sequence of {max_model_len} tokens "
              f"(data.max_prompt_tokens={d.max_prompt_tokens} + response tokens "
              f"{max(r.max_response_tokens, cfg.eval.max_response_tokens)}, capped at the model's "
              f"{spec.max_position_embeddings}; {per_token} bytes a token)")
    if dev.is_gpu():
        return (f"{sizing}, more than rollout.gpu_memory_utilization={r.gpu_memory_utilization} leaves for it: raise "
                f"rollout.gpu_memory_utilization, or lower data.max_prompt_tokens or rollout.max_response_tokens")
    holds = r.kv_cache_memory_bytes // (per_token * block) * block
    return (f"{sizing}; rollout.kv_cache_memory_bytes={r.kv_cache_memory_bytes} holds {holds} tokens: set "
            f"rollout.kv_cache_memory_bytes={need} or more (for a batch of sequences: that times the sequences "
            f"decoded at once), or lower data.max_prompt_tokens or rollout.max_response_tokens")
