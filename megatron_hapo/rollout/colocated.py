"""rollout.placement=colocated: every rank holds a share of a vLLM engine (one per inference-TP group,
`rollout/engine.py`) and generates between updates; the policy's weights go into it in place
(`weight_sync.sync_policy_to_engine`), and with rollout.enable_sleep_mode on GPU its memory is
released for the update and taken back in stages (weights, the sync, then the KV cache)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch.distributed as dist

from ..algorithms import EntropyStats
from ..metrics import progress_bar
from .assemble import rollout_side, run_inputs
from .collect import GroupSummary, Layout, RolloutBatch
from .source import PolicyVersion, RolloutSource
from .weight_sync import sync_policy_to_engine


class ColocatedRollout(RolloutSource):
    def __init__(self, cfg, model_dir: str, control, dp: int, dp_rank: int, progress: bool):
        self.cfg, self.control, self.progress = cfg, control, progress
        self.layout = Layout.for_rank(cfg, dist.get_world_size(), dist.get_rank(), dp, dp_rank)
        self.inputs = run_inputs(cfg, model_dir)
        self.engine = self.rewards = self.collector = self.sampling = None
        # the engine starts from the model folder's weights: a sync is owed when the policy's differ
        self.stale_engine, self.started = bool(cfg.model.load), False

    def open(self) -> None:
        self.engine, self.rewards, self.collector, self.sampling = rollout_side(self.cfg, self.inputs, self.layout,
                                                                                self.control)

    def restore(self, checkpoint: str) -> None:
        self.stale_engine = True

    def start(self, policy, version: PolicyVersion, data_position: int) -> Dict[str, float]:
        if self.started:
            return {}
        self.started = True
        return self.sync(policy, version) if self.stale_engine else {}

    def sync(self, policy, version: PolicyVersion, data_position: int = 0) -> Dict[str, float]:
        self.started, self.stale_engine = True, False
        return sync_policy_to_engine(policy, self.engine)

    def collect(self, step: int, data_position: int, stats: Optional[EntropyStats]) -> Tuple[RolloutBatch, int, Any]:
        bar = progress_bar(self.progress, f"step {step} rollout", self.cfg.rollout.prompts_per_step)
        try:
            batch, data_position = self.collector.collect(data_position, self.inputs.sampler, self.inputs.train_data,
                                                          self.sampling, self.cfg.rollout, stats, bar)
        finally:
            bar.close()
        return batch, data_position, None

    def release_memory(self) -> None:
        self.engine.sleep()  # with rollout.enable_sleep_mode on GPU; a no-op otherwise

    def publish(self, policy, version: PolicyVersion) -> Dict[str, float]:
        self.engine.wake_up_weights()  # staged: weights, the sync, then the KV cache
        sync = self.sync(policy, version)
        self.engine.wake_up_kv_cache()
        return sync

    def step_metrics(self, record: Any, step: int, batch: RolloutBatch, row: Dict[str, Any]) -> Dict[str, float]:
        return {"rollout_tokens_per_s": row["response_tokens"] / max(row["time_rollout"], 1e-9)}

    def evaluate(self, count: int, n: int) -> List[GroupSummary]:
        from .engine import SamplingConfig

        sampling = SamplingConfig.for_eval(self.cfg.eval, self.cfg.rollout.max_response_tokens, self.inputs.stop_ids)
        bar = progress_bar(self.progress, "eval", -(-count // (256 * self.layout.num_engines)))
        try:
            return self.collector.evaluate(self.inputs.eval_data, count, sampling, n, bar)
        finally:
            bar.close()

    def close(self) -> None:
        """Reward workers, then the engine (its memory and vLLM's groups; the job's process group stays)."""
        if self.rewards is not None:
            self.rewards.close()
        if self.engine is not None:
            self.engine.close()
