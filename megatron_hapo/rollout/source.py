"""Where a trainer's rollouts come from, whatever the placement: one interface, two implementations.

    colocated (`rollout/colocated.py`): every rank holds a share of a vLLM engine and generates its
        own rollouts between updates; weights go into the engine in place.
    separate (`rollout/remote.py`): engines on their own ranks (`rollout/engine_rank.py`) run the
        schedule (lockstep or streaming); the trainer ranks receive batches and send versions.

The trainer calls the same methods in the same order for both (docs/ARCHITECTURE.md "Placement"):

    source = open_source(cfg, roles, model_dir, control, dp, dp_rank)   # before the policy: the inputs
    source.open()                                                       # after the policy: the engine
    source.restore(checkpoint_path)                                     # on a resume
    source.start(policy, PolicyVersion(step, stats), data_position)     # at first use; idempotent
    loop: source.collect(...) → source.release_memory() → old pass, update →
          source.publish(policy, PolicyVersion(step + 1, new stats)) → source.step_metrics(...)
    source.evaluate(...), source.sync(...), source.checkpoint_blobs(step), source.close()

The placement `if` lives in `open_source` alone.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

from ..algorithms import EntropyStats
from .assemble import RunInputs
from .collect import GroupSummary, Layout, RolloutBatch


@dataclasses.dataclass(frozen=True)
class PolicyVersion:
    """A version of the policy as the engines see it: the weights after `number` updates, and the
    entropy statistics its rollouts take their temperatures from (docs/HAPO.md "Across policy
    versions"; None before the first step)."""

    number: int
    stats: Optional[EntropyStats] = None


class RolloutSource:
    """The interface. `inputs`: the run's model folder read (tokenizer, spec, data, sampler, stop ids);
    `layout`: this rank's place (its data-parallel share of the rollouts)."""

    inputs: RunInputs
    layout: Layout

    def open(self) -> None:
        """Builds what must come after the policy (colocated: the engine, so it takes the memory left)."""

    def restore(self, checkpoint: str) -> None:
        """A resume from `checkpoint`: what the source kept in it, and that the engines need the weights."""

    def start(self, policy, version: PolicyVersion, data_position: int) -> Dict[str, float]:
        """The engines serve `version` (the loaded, resumed or warmed-up weights) from `data_position`;
        idempotent: only the first call does anything. Returns the weight sync's bytes and seconds."""
        raise NotImplementedError

    def sync(self, policy, version: PolicyVersion, data_position: int = 0) -> Dict[str, float]:
        """The policy's weights into the engines now, as `version` (after a warm-up in this process, say);
        before `start`, it starts them (from `data_position`)."""
        raise NotImplementedError

    def collect(self, step: int, data_position: int, stats: Optional[EntropyStats]) -> Tuple[RolloutBatch, int, Any]:
        """Step `step`'s rollouts: this rank's RolloutBatch, the data position after them, and the
        schedule's record (for `step_metrics`)."""
        raise NotImplementedError

    def release_memory(self) -> None:
        """The update is about to run: the engines' memory may go (colocated sleep mode)."""

    def publish(self, policy, version: PolicyVersion) -> Dict[str, float]:
        """The update made `version`: its weights and statistics to the engines. Bytes and seconds."""
        raise NotImplementedError

    def step_metrics(self, record: Any, step: int, batch: RolloutBatch, row: Dict[str, Any]) -> Dict[str, float]:
        """The placement's own metrics of a step (`row`: the step's metrics so far)."""
        raise NotImplementedError

    def evaluate(self, count: int, n: int) -> List[GroupSummary]:
        """n greedy samples of each of the first `count` held-out prompts, at the current version."""
        raise NotImplementedError

    def checkpoint_blobs(self, step: int) -> Dict[str, Any]:
        """Files of the source's own state to keep in the checkpoint of `step` (name → object)."""
        return {}

    def close(self) -> None:
        raise NotImplementedError


def open_source(cfg, roles, model_dir: str, control, dp: int, dp_rank: int, progress: bool) -> RolloutSource:
    """The source for this placement (`roles`: the launch's split, None when colocated)."""
    if cfg.rollout.placement == "separate":
        from .remote import RemoteRollout

        return RemoteRollout(cfg, roles, model_dir, control, dp, dp_rank)
    from .colocated import ColocatedRollout

    return ColocatedRollout(cfg, model_dir, control, dp, dp_rank, progress)
