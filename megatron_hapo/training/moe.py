"""What a MoE policy adds to the passes: routing replay, the auxiliary losses' weight, and the
expert-load and aux-loss metrics.

Contract: `MoEPolicyState(policy)` hooks every router of the policy's chunks once; the policy calls
`begin(batch)` before a training step's micro-batches, `replay(chunk, routing)` before each
micro-batch's forward when routing replay is on, and `end(n_micro)` after the step for the metrics
(`moe_*`). `take_routing_mismatch()` reports, over all ranks, the share of (token, layer) pairs the
trainer's own router would have routed apart from the replayed rollout. Dense models never build it.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist

from .batch import sequence_lengths


class MoEPolicyState:
    def __init__(self, policy):
        self.p = policy
        self.aux_coef = policy.config.moe_aux_loss_coeff
        self.z_coef = policy.config.moe_z_loss_coeff
        self.load = torch.zeros(policy.spec.num_layers, policy.spec.num_experts, dtype=torch.float64, device=policy.device)
        self.replay_diff = torch.zeros(2, dtype=torch.float64, device=policy.device)  # (tokens routed apart, tokens)
        self._install_hooks()

    def take_routing_mismatch(self) -> Optional[float]:
        """Routing replay: the share of (real token, MoE layer) pairs whose experts the trainer's own
        router would have chosen differently from the rollout's (over all ranks) since the last call;
        None without replayed passes."""
        if not self.p.cfg.routing_replay:
            return None
        d = self.replay_diff.clone()
        dist.all_reduce(d)  # a ratio: replicas (TP without SP) count both parts alike
        self.replay_diff.zero_()
        return float(d[0] / d[1]) if d[1] > 0 else None

    def replay(self, model, routing: Optional[torch.Tensor]) -> None:
        """Before a micro-batch's forward: each router of this model chunk replays the rollout's
        experts for its layer (Megatron's RouterReplay, REPLAY_FORWARD), or routes itself when the
        micro-batch carries none. routing [b, s, layers, k], −1 where nothing was recorded (the last
        token, padding): those positions take experts 0..k−1, which only shape outputs no loss reads.
        Megatron's token order is [s, b] flattened; under sequence parallelism a TP rank routes
        its slice of s."""
        from megatron.core.transformer.moe.router import Router
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        routers = [m for m in model.modules() if isinstance(m, Router)]
        if routing is None:
            for router in routers:
                router.router_replay.clear_router_replay_action()
            return
        k = self.p.spec.moe_top_k
        idx = routing.to(self.p.device, torch.long).transpose(0, 1)  # [s, b, layers, k]
        if self.p.config.sequence_parallel:
            idx = idx.chunk(self.p.cfg.tensor_model_parallel_size, dim=0)[self.p.tp_rank]
        recorded = (idx >= 0).all(-1)  # [s, b, layers]
        idx = torch.where(idx < 0, torch.arange(k, device=self.p.device), idx)
        for router in routers:
            replay = router.router_replay
            replay.clear_indices()
            layer = router.layer_number - 1
            replay.set_target_indices(idx[:, :, layer].reshape(-1, k).contiguous())
            replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
            replay.recorded = recorded[:, :, layer].reshape(-1)  # for the mismatch metric

    def _install_hooks(self) -> None:
        """Counts tokens per expert in training passes (a hook on each router; padding excluded), and
        under routing replay the tokens the router would have sent elsewhere."""
        def count(router, inputs, output):
            padding = inputs[1] if len(inputs) > 1 and inputs[1] is not None else None
            real = None if padding is None else ~padding.transpose(0, 1).reshape(-1).bool()
            if router.training:
                routing_map = output[1] if real is None else output[1] & real[:, None]
                self.load[router.layer_number - 1] += routing_map.sum(0).double()
            replay = getattr(router, "router_replay", None)
            if replay is not None and replay.router_replay_action is not None and replay.target_topk_idx is not None:
                with torch.no_grad():  # what the router would have chosen: the mismatch replay removed
                    own = router.gating(inputs[0].reshape(-1, inputs[0].shape[-1])).topk(self.p.spec.moe_top_k, -1).indices
                    apart = (own.sort(-1).values != replay.target_topk_idx.sort(-1).values).any(-1)
                    apart = apart[replay.recorded if real is None else replay.recorded & real]
                    self.replay_diff += torch.stack([apart.sum(), torch.tensor(apart.numel(), device=apart.device)]).double()

        from megatron.core.transformer.moe.router import Router

        for chunk in self.p.chunks:
            for module in chunk.module.modules():
                if isinstance(module, Router):
                    module.register_forward_hook(count)

    def begin(self, batch) -> None:
        """Megatron scales each micro-batch's aux/z loss by its routed tokens, and the step divides
        every gradient by the loss's count (calculate_per_token_loss: response tokens for
        token-mean, sequences for seq-mean): the coefficient would weigh the aux loss by (real
        tokens / count), which varies with prompt lengths and the aggregation. Scaled here by count
        / real tokens (global), the objective is: the policy loss + coefficient × the
        real-token-weighted mean of the micro-batches' aux losses, under every TP/PP/EP layout,
        aggregation and prompt share. (Megatron's load-balancing loss is a per-micro-batch
        statistic: a different split into micro-batches changes its value, not its weight.)"""
        counts = torch.stack([self.p.loss.normalizer(batch.loss_mask), sequence_lengths(batch.loss_mask).sum()])
        counts = counts.double().to(self.p.device)
        dist.all_reduce(counts, group=self.p.dp_group)
        scale = float(counts[0] / counts[1].clamp(min=1))
        self.p.config.moe_aux_loss_coeff = self.aux_coef * scale
        if self.z_coef:
            self.p.config.moe_z_loss_coeff = self.z_coef * scale
        self.load.zero_()

    def end(self, n_micro: int) -> Dict[str, float]:
        """moe_<loss> (mean over layers and micro-batches, every rank) and moe_<loss>_layer<i>;
        tokens per expert over the step (min, max, and max / mean)."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

        # each layer lives on one stage; every DP replica computed it; under sequence parallelism each
        # TP rank computed its slice's share (the tokens per expert are reduced over TP), else all of it
        world, tp = dist.get_world_size(), self.p.cfg.tensor_model_parallel_size
        replicas = world // self.p.pp_size // (tp if self.p.config.sequence_parallel else 1)
        out: Dict[str, float] = {}
        for name, entry in sorted(get_moe_layer_wise_logging_tracker().items()):
            values = entry["values"].detach().double().clone()
            dist.all_reduce(values)
            values /= replicas * n_micro
            short = {"load_balancing_loss": "moe_aux_loss", "z_loss": "moe_z_loss"}.get(name, f"moe_{name}")
            out[short] = float(values.mean())
            out.update({f"{short}_layer{i}": float(v) for i, v in enumerate(values.tolist())})
        clear_aux_losses_tracker()
        load = self.load.clone()
        dist.all_reduce(load)  # sum over replicas; tokens are replicated over TP without SP
        if self.p.cfg.tensor_model_parallel_size > 1 and not self.p.config.sequence_parallel:
            load /= self.p.cfg.tensor_model_parallel_size
        mean = load.mean().clamp(min=1e-9)
        out.update(moe_tokens_per_expert_min=float(load.min()), moe_tokens_per_expert_max=float(load.max()),
                   moe_load_imbalance=float(load.max() / mean))
        return out
