"""The policy as a Megatron-Core GPTModel: old-policy pass and HAPO/DAPO/GRPO updates inside
Megatron's own forward-backward schedules (no pipelining, or 1F1B with PP > 1) and optimizer.

Contract: `MegatronPolicy` owns the model chunks, the optimizer and the LR schedule, and runs the
passes: `compute_logprobs` (no grad; log-probs and entropies per label position, at T = 1 or a
per-token T) and `train_step` (one optimizer step on this rank's share of a mini-batch). The batch
type and micro-batching live in `batch.py`, the HF-named weights (load, and the one walk out) in
`weights.py`, what MoE adds (routing replay, aux-loss weight, expert load) in `moe.py`.

Per-token tensors are aligned with label positions: entry t of a row scores token t+1, so a
response token at position p is scored at p − 1 (`loss_mask` marks those positions). Prompt
positions and padding never enter the loss.

Normalization: the loss function returns the local *sum* of the per-token (or per-sequence)
losses and its count; Megatron runs with calculate_per_token_loss and divides the gradients by
the count summed over micro-batches and data-parallel ranks, so token-mean is over the whole
mini-batch whatever the split (HAPO.md, "Policy loss").
"""
from __future__ import annotations

import dataclasses
import math
import time
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from .. import device as dev
from ..algorithms import AlgorithmConfig, PolicyLoss
from ..config import OptimConfig
from ..models.hf_config import ModelSpec, build_gpt_model, transformer_config
from ..parallel import vocab_parallel_logprobs_and_entropy
from . import weights
from .batch import MicroBatcher, PolicyBatch
from .moe import MoEPolicyState


@dataclasses.dataclass
class PolicyConfig(OptimConfig):
    """The Megatron side of a run: layout, precision, micro-batching, and the optimizer settings
    it inherits from `OptimConfig` (the same fields and defaults a run reads from `train.*`)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None  # None = TP
    moe_aux_loss_coef: Optional[float] = None  # None = the model config's router_aux_loss_coef
    moe_z_loss_coef: float = 0.0
    routing_replay: bool = False  # MoE: batches may carry the rollout's experts ("routing"); the passes replay them
    use_distributed_optimizer: bool = False
    micro_batch_size: int = 1
    dtype: str = "float32"  # bfloat16 on GPU
    layer_spec: str = "auto"  # te | local | auto (te on GPU, local on CPU)
    train_steps: int = 100000  # the LR schedule's length, in lr_warmup_unit
    logprob_chunk_size: Optional[int] = 1024
    max_tokens_per_micro_batch: int = 0  # > 0: token-budget micro-batches of packed sequences (micro_batch_size unused)
    seed: int = 1234

    @classmethod
    def from_config(cls, cfg) -> "PolicyConfig":
        """From a run's `Config`: each field from the section that owns it."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for section in (cfg.parallel, cfg.model, cfg.train):
            values.update({f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name in names})
        values["routing_replay"] = cfg.rollout.routing_replay
        values["train_steps"] = cfg.optimizer_steps() if cfg.train.lr_warmup_unit == "optimizer_steps" else cfg.train.steps
        return cls(**values)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"policy.dtype: {self.dtype!r}; expected 'float32' or 'bfloat16'")
        return getattr(torch, self.dtype)


class MegatronPolicy:
    """A Megatron GPTModel (DDP-wrapped chunks), its optimizer and LR schedule, and the RL passes."""

    def __init__(self, spec: ModelSpec, cfg: PolicyConfig, algo: AlgorithmConfig):
        from megatron.core import parallel_state as ps

        self.spec, self.cfg, self.algo = spec, cfg, algo
        self.loss = PolicyLoss(algo)
        tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
        vpp = cfg.virtual_pipeline_model_parallel_size
        ep = cfg.expert_model_parallel_size
        etp = tp if cfg.expert_tensor_parallel_size is None else cfg.expert_tensor_parallel_size
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size())
        if have != (tp, pp, ep, etp):
            raise ValueError(f"parallel state has TP={have[0]}, PP={have[1]}, EP={have[2]}, ETP={have[3]}; the policy "
                             f"config asks for TP={tp}, PP={pp}, EP={ep}, ETP={etp}")
        if cfg.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size: must be ≥ 1, got {cfg.micro_batch_size}")
        if vpp:
            # Measured: the interleaved 1F1B schedule over gloo feeds the training forward with
            # mismatched activations (forward-only passes match). Refused on every device until a
            # 2-GPU check matches it against PP without interleaving.
            raise ValueError("virtual_pipeline_model_parallel_size: refused (over gloo the interleaved schedule's "
                             "training forward does not match PP without interleaving; not yet checked on GPUs)")
        self.layer_spec = dev.resolve_layer_spec(cfg.layer_spec)
        self.device = dev.device()
        dtype = cfg.torch_dtype()
        if spec.is_moe and tp > 1 and not cfg.sequence_parallel:
            raise ValueError(f"tensor_model_parallel_size={tp} with a MoE model: Megatron requires sequence parallelism; "
                             "set parallel.sequence_parallel=true")
        self.config = transformer_config(spec, tp, pp, dtype=dtype, sequence_parallel=cfg.sequence_parallel, vpp=vpp,
                                         ep=ep, etp=etp, aux_loss_coef=cfg.moe_aux_loss_coef,
                                         z_loss_coef=cfg.moe_z_loss_coef, layer_spec=self.layer_spec)
        if cfg.routing_replay:
            if not spec.is_moe:
                raise ValueError("routing_replay: the model has no experts")
            from megatron.core.transformer.moe.router_replay import RouterReplay

            RouterReplay.clear_global_router_replay_instances()  # a class-level list: this model's routers only
            self.config.moe_enable_routing_replay = True
        self.config.calculate_per_token_loss = True
        # Sequence parallelism splits the sequence over TP ranks: widths are padded to a multiple of
        # TP, and of 64 with TE (its fused kernels' alignment).
        sp = self.config.sequence_parallel
        self.width_multiple = math.lcm(tp if sp else 1, 64 if sp and self.layer_spec == "te" else 1)
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.dp_group = ps.get_data_parallel_group()
        self.pp_rank, self.pp_size = ps.get_pipeline_model_parallel_rank(), pp
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.ep, self.etp = ep, etp
        if spec.is_moe:
            self.ep_group, self.ep_rank = ps.get_expert_model_parallel_group(), ps.get_expert_model_parallel_rank()
            self.etp_group, self.etp_rank = ps.get_expert_tensor_parallel_group(), ps.get_expert_tensor_parallel_rank()
        with dev.megatron_scope():
            self._build(vpp, dtype)
        self.moe = MoEPolicyState(self) if spec.is_moe else None
        self.batcher = MicroBatcher(cfg.micro_batch_size, cfg.max_tokens_per_micro_batch, self.layer_spec, self.device,
                                    self.width_multiple, spec.is_moe)
        self.steps_done = 0
        self.skipped_steps = 0
        if self.packing and pp > 1:
            self.config.variable_seq_lengths = True  # packed rows differ in width: pipeline p2p sends shapes

    def _build(self, vpp, dtype) -> None:
        """Model chunks on this rank's device (DDP-wrapped), the optimizer and the LR schedule."""
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        spec, cfg = self.spec, self.cfg
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=cfg.use_distributed_optimizer
        )
        self.chunks = []
        for vp in range(vpp or 1):
            vp_stage = vp if vpp else None
            module = build_gpt_model(
                spec, self.config,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage, layer_spec=self.layer_spec,
            )
            self.chunks.append(DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=module,
                                                       disable_bucketing=vp > 0))
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = [c.no_sync for c in self.chunks] if len(self.chunks) > 1 else self.chunks[0].no_sync
        opt_config = OptimizerConfig(
            optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr if cfg.min_lr is not None else cfg.lr,
            weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
            clip_grad=cfg.clip_grad, bf16=dtype == torch.bfloat16, params_dtype=dtype,
            use_distributed_optimizer=cfg.use_distributed_optimizer,
        )
        self.optimizer = get_megatron_optimizer(opt_config, self.chunks)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if cfg.lr_warmup_steps else cfg.lr, max_lr=cfg.lr,
            min_lr=opt_config.min_lr, lr_warmup_steps=cfg.lr_warmup_steps,
            lr_decay_steps=max(cfg.train_steps, cfg.lr_warmup_steps + 1), lr_decay_style="constant",
            start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=max(cfg.train_steps, 1),
            wd_incr_style="constant",
        )

    # ---- weights ------------------------------------------------------------------------------

    # ---- weights (training/weights.py) ---------------------------------------------------------

    def load_hf_state_dict(self, hf: Dict[str, torch.Tensor]) -> None:
        weights.load_hf_state_dict(self, hf)

    def hf_weights(self, bucket_bytes: int = 64 * 2**20):
        """The one walk of the weights (`weights.hf_weights`): HF names, complete on every rank, on the device."""
        return weights.hf_weights(self, bucket_bytes)

    def hf_state_dict(self) -> Dict[str, torch.Tensor]:
        return weights.hf_state_dict(self)

    def check_finite(self) -> None:
        weights.check_finite(self)

    # ---- passes -------------------------------------------------------------------------------

    def take_token_counts(self) -> Dict[str, float]:
        """Tokens the passes computed (padding included) and real tokens, since the last call."""
        return self.batcher.take_token_counts()

    def take_padding_factor(self) -> Dict[str, float]:
        """Tokens computed (padding included) over real tokens since the last call, summed over the
        data-parallel group: 1.0 is no waste (max_tokens_per_micro_batch packs to ~1)."""
        counts = self.take_token_counts()
        sums = torch.tensor([counts["tokens_computed"], counts["tokens_real"]], dtype=torch.float64)
        dist.all_reduce(sums, group=self.dp_group)  # host tensors: gloo, on GPU nodes too
        return {"padding_factor": sums[0].item() / max(sums[1].item(), 1.0)}

    def take_routing_mismatch(self) -> Optional[float]:
        """Routing replay (`moe.MoEPolicyState`): the share of (token, layer) pairs routed apart; None
        for a dense model or without replayed passes."""
        return self.moe.take_routing_mismatch() if self.moe is not None else None

    @property
    def packing(self) -> bool:
        return self.batcher.packing

    def _run(self, micro: List[dict], loss_fn, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            extra = {"packed_seq_params": mb["packed_seq_params"]} if mb.get("packed_seq_params") is not None else {}
            if self.spec.is_moe:  # padding is neither routed into the load statistics nor the aux losses
                extra["padding_mask"] = mb["padding"]
            if self.cfg.routing_replay:
                self.moe.replay(model, mb.get("routing"))
            output = model(mb["input_ids"], mb["position_ids"], mb["attention_mask"], **extra)
            return output, partial(loss_fn, mb)

        iters = [iter(micro) for _ in self.chunks] if len(self.chunks) > 1 else iter(micro)
        with dev.megatron_scope():
            return get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iters,
                model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
                num_microbatches=len(micro),
                seq_length=max(mb["input_ids"].shape[1] for mb in micro),
                micro_batch_size=micro[0]["input_ids"].shape[0],
                forward_only=forward_only,
            )

    def _logprobs(self, mb, logits, temperature=1.0, entropy_grad=False):
        """(log-prob, entropy) of the labels in the per-sequence layout of mb["batch"] (packed rows
        are unpacked; a per-token temperature in that layout is packed to match)."""
        gather, shape = mb["gather"], mb["input_ids"].shape
        if gather is not None and isinstance(temperature, torch.Tensor):
            flat = torch.ones(shape.numel() + 1, dtype=temperature.dtype, device=temperature.device)
            flat[gather.reshape(-1)] = temperature.reshape(-1)  # positions past an end all land on the spare slot
            temperature = flat[:-1].view(shape)
        logp, ent = vocab_parallel_logprobs_and_entropy(
            logits, mb["labels"], temperature, group=self.tp_group if self.cfg.tensor_model_parallel_size > 1 else None,
            chunk_size=self.cfg.logprob_chunk_size, vocab_size=self.spec.vocab_size, entropy_grad=entropy_grad,
        )
        if gather is None:
            return logp, ent
        spare = logp.new_zeros(1)
        return torch.cat([logp.reshape(-1), spare])[gather], torch.cat([ent.reshape(-1), spare])[gather]

    def _from_last_stage(self, t: Optional[torch.Tensor], shape, dtype) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        if self.pp_size == 1:
            return t
        if t is None:
            t = torch.empty(shape, dtype=dtype, device=self.device)
        t = t.contiguous()
        dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(), group=self.pp_group)
        return t

    @torch.no_grad()
    def compute_logprobs(self, batch: PolicyBatch, temperature=1.0, also_at: Optional[torch.Tensor] = None):
        """No-grad forward: (log-prob, entropy) per label position [B, S] at T = 1 (or a per-token
        T [B, S]), on every rank of this data-parallel replica, on the device of `batch`. With
        `also_at` (per-token temperatures [B, S], e.g. the engine's recorded T_b), also the log-probs
        at those temperatures from the same forward: (log-prob, entropy, log-prob at also_at)."""
        out_device, width = batch.input_ids.device, batch.input_ids.shape[1]
        temps = {k: v for k, v in (("temperature", temperature), ("also_at", also_at)) if isinstance(v, torch.Tensor)}
        if batch.routing is not None:
            temps["routing"] = batch.routing
        batch = PolicyBatch(batch.input_ids, batch.loss_mask, batch.segment_ids, **temps)
        batch = self.batcher.fit_width(batch).to(self.device)
        n_rows, mbs = batch.size, self.cfg.micro_batch_size
        if n_rows % mbs and not self.packing:  # forward-only: pad with empty rows to whole micro-batches, drop them after
            pad = batch.select(torch.zeros(mbs - n_rows % mbs, dtype=torch.long))
            pad.loss_mask = torch.zeros_like(pad.loss_mask)
            batch = batch.cat(pad)
        for c in self.chunks:
            c.eval()

        def per_token(b, name):  # 1 where nothing is scored (padding, prompts)
            return torch.where(b.loss_mask, b.inputs[name], 1.0).clamp(min=1e-6)

        def loss_fn(mb, logits):
            b = mb["batch"]
            logp, ent = self._logprobs(mb, logits, per_token(b, "temperature") if "temperature" in b.inputs else temperature)
            out = {"logp": logp.float(), "entropy": ent.float()}
            if "also_at" in b.inputs:
                out["also_at"] = self._logprobs(mb, logits, per_token(b, "also_at"))[0].float()
            return torch.zeros((), dtype=torch.float32), out

        micro = self.batcher.split(batch)
        store = self._run(micro, loss_fn, forward_only=True)
        for c in self.chunks:
            c.train()
        names = ["logp", "entropy"] + (["also_at"] if also_at is not None else [])
        stacked = None
        if store:  # the last pipeline stage: each micro-batch's sequences back to their rows
            stacked = torch.zeros((len(names),) + tuple(batch.input_ids.shape), dtype=torch.float32, device=self.device)
            for mb, out in zip(micro, store):
                vals = torch.stack([out[k] for k in names])
                stacked[:, mb["rows"].to(self.device), :vals.shape[-1]] = vals
        stacked = self._from_last_stage(stacked, (len(names),) + tuple(batch.input_ids.shape), torch.float32)
        mask = batch.loss_mask
        return tuple(torch.where(mask, t, 0.0)[:n_rows, :width].to(out_device) for t in stacked)

    def end_rollout_step(self) -> None:
        """Advances the LR schedule by one rollout step when it counts rollout steps
        (lr_warmup_unit=rollout_steps); a no-op when it counts optimizer steps."""
        if self.cfg.lr_warmup_unit == "rollout_steps":
            with dev.megatron_scope():
                self.scheduler.step(increment=1)

    def train_step(self, batch: PolicyBatch) -> Dict[str, float]:
        """One optimizer step on this rank's share of a mini-batch (split into micro-batches)."""
        self.loss.check(batch.inputs)
        t0 = time.perf_counter()
        batch = self.batcher.fit_width(batch)

        def loss_fn(mb, logits):
            b: PolicyBatch = mb["batch"]
            # a per-token temperature (rollout.old_logprobs=engine): the current policy at the T π_old was taken at
            t = b.inputs.get("temperature")
            logp, ent = self._logprobs(mb, logits, 1.0 if t is None else torch.where(b.loss_mask, t, 1.0).clamp(min=1e-6))
            loss_sum, count, sums = self.loss(logp, ent, b.loss_mask, b.inputs)
            return loss_sum, count.to(torch.int), sums

        with dev.megatron_scope():
            for c in self.chunks:
                c.zero_grad_buffer()
            self.optimizer.zero_grad()
        if self.moe is not None:
            self.moe.begin(batch)
        micro = self.batcher.split(batch)
        store = self._run(micro, loss_fn, forward_only=False)

        keys = PolicyLoss.SUMS
        sums = torch.zeros(len(keys), dtype=torch.float64, device=self.device)
        for s in store:
            for i, k in enumerate(keys):
                if k in s:
                    sums[i] += s[k].double()
        sums = self._from_last_stage(sums, (len(keys),), torch.float64)
        dist.all_reduce(sums, group=self.dp_group)
        metrics = self.loss.metrics(dict(zip(keys, sums.tolist())))

        # LR for this update (warm-up reaches the full LR at step lr_warmup_steps), then the step.
        with dev.megatron_scope():
            if self.cfg.lr_warmup_unit == "optimizer_steps":
                self.scheduler.step(increment=1)
            found_inf = self.optimizer.prepare_grads()
            grad_norm = self.optimizer.get_grad_norm()
            skipped = bool(found_inf) or grad_norm is None or not math.isfinite(grad_norm)
            if skipped:
                self.optimizer.zero_grad()
                self.skipped_steps += 1
            else:
                ok, grad_norm, _ = self.optimizer.step()
                skipped = not ok
        self.steps_done += 1
        if self.moe is not None:
            metrics.update(self.moe.end(len(micro)))
        metrics.update(grad_norm=float("nan") if grad_norm is None else float(grad_norm), skipped=float(skipped),
                       lr=self.optimizer.param_groups[0]["lr"],
                       tokens_per_s=metrics["tokens"] / max(time.perf_counter() - t0, 1e-9))
        return metrics
