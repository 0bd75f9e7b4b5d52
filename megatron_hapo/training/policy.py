"""The policy as a Megatron-Core GPTModel: old-policy pass and HAPO/DAPO/GRPO updates inside
Megatron's own forward-backward schedules (no pipelining, or 1F1B with PP > 1) and optimizer.

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
import itertools
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
from ..models.mapping import (
    hf_to_megatron,
    expert_index,
    layer_offset,
    megatron_state_to_hf,
    merge_tp,
    param_kind,
    unfuse_hf_experts,
    with_expert_index,
)
from ..parallel import vocab_parallel_logprobs_and_entropy


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


class PolicyBatch:
    """One data-parallel rank's share of a (mini-)batch: what the model reads, and the loss's
    inputs by name (whatever `algorithms.PolicyLoss.inputs` declares; none for a forward pass).

    input_ids [B, S]: prompt + response tokens, right-padded. loss_mask [B, S]: True at positions t
    whose next token t+1 is a response token. segment_ids [B, S]: for packed rows, the sequence
    each token belongs to (attention stays within a segment, positions restart). Each input is
    per position [B, S] (aligned like loss_mask) or per sequence [B]; None values are dropped.
    """

    def __init__(self, input_ids: torch.Tensor, loss_mask: torch.Tensor, segment_ids: Optional[torch.Tensor] = None,
                 **inputs: Optional[torch.Tensor]):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [batch, seq], got shape {tuple(input_ids.shape)}")
        shape = tuple(input_ids.shape)
        self.input_ids, self.segment_ids = input_ids, segment_ids
        self.inputs = {k: v for k, v in inputs.items() if v is not None}
        for name, t in (("loss_mask", loss_mask), ("segment_ids", segment_ids)):
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name}: shape {tuple(t.shape)} does not match input_ids {shape}")
        for name, t in self.inputs.items():
            if tuple(t.shape) != (shape[0],) and tuple(t.shape[:2]) != shape:
                raise ValueError(f"{name}: shape {tuple(t.shape)}; expected per sequence ({shape[0]},) or per position "
                                 f"{shape} (and trailing dimensions)")
        self.loss_mask = loss_mask.bool()
        if bool(self.loss_mask[:, -1].any()):
            raise ValueError("loss_mask: the last position has no next token to score")

    def __getattr__(self, name):  # batch.old_logp: an input, or None when the batch does not carry it
        if name.startswith("__") or name == "inputs":
            raise AttributeError(name)
        return self.inputs.get(name)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx) -> "PolicyBatch":
        return self._map(lambda t: t[idx])

    def to(self, device) -> "PolicyBatch":
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pad_width(self, width: int) -> "PolicyBatch":
        """Right-pads every row to `width` positions (nothing scored there)."""
        extra = width - self.input_ids.shape[1]
        if extra <= 0:
            return self
        def pad(t):
            if t.dim() == 1:
                return t
            # routing records pad with −1 (no expert recorded); everything else with 0
            fill = -1 if t.dtype in (torch.int16, torch.uint8, torch.int32, torch.int64) and t.dim() > 2 else 0
            return torch.cat([t, t.new_full((t.shape[0], extra) + tuple(t.shape[2:]), fill)], dim=1)

        return self._map(pad)

    def cat(self, other: "PolicyBatch") -> "PolicyBatch":
        return self._map(lambda t, o: torch.cat([t, o]), other)

    def _map(self, fn, other: Optional["PolicyBatch"] = None) -> "PolicyBatch":
        def f(name, t):
            if t is None:
                return None
            return fn(t) if other is None else fn(t, getattr(other, name) if name in ("input_ids", "loss_mask", "segment_ids")
                                                   else other.inputs[name])

        return PolicyBatch(f("input_ids", self.input_ids), f("loss_mask", self.loss_mask), f("segment_ids", self.segment_ids),
                           **{k: f(k, v) for k, v in self.inputs.items()})


def num_micro_batches(batch_size: int, micro_batch_size: int) -> int:
    if micro_batch_size < 1 or batch_size % micro_batch_size:
        raise ValueError(f"micro_batch_size={micro_batch_size} does not divide the batch of {batch_size} sequences "
                         "on this data-parallel rank")
    return batch_size // micro_batch_size


def model_inputs(input_ids: torch.Tensor, segment_ids: Optional[torch.Tensor] = None, with_mask: bool = True):
    """(position_ids, attention_mask, labels): causal mask (True = masked), block-diagonal when packed;
    mask None when with_mask=False (TE: its causal attention implies it, THD parameters carry the
    segments)."""
    b, s = input_ids.shape
    causal = torch.ones(s, s, dtype=torch.bool, device=input_ids.device).triu(1) if with_mask else None
    if segment_ids is None:
        position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        mask = None if causal is None else causal[None, None].expand(b, 1, s, s)
    else:
        mask = None
        if with_mask:
            mask = (causal[None] | (segment_ids[:, :, None] != segment_ids[:, None, :]))[:, None]
        starts = torch.ones_like(segment_ids, dtype=torch.bool)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        idx = torch.arange(s, device=input_ids.device).expand(b, s)
        seg_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
        position_ids = idx - seg_start
    labels = torch.zeros_like(input_ids)
    labels[:, :-1] = input_ids[:, 1:]
    return position_ids.contiguous(), None if mask is None else mask.contiguous(), labels


def sequence_lengths(loss_mask: torch.Tensor) -> torch.Tensor:
    """Real tokens per row of a right-padded batch: through the last scored token (position of the
    last loss position + 2); 1 for a row with nothing scored (its tokens never reach the loss)."""
    s = loss_mask.shape[1]
    last = torch.where(loss_mask, torch.arange(s, device=loss_mask.device), -1).amax(dim=1)
    return torch.where(last >= 0, last + 2, torch.ones_like(last))


def pack_sequences(lengths: List[int], max_tokens: int) -> List[List[int]]:
    """Sequence indices grouped into micro-batches of at most `max_tokens` tokens (a longer
    sequence alone): first-fit over the lengths in decreasing order, deterministic, so the
    micro-batches of a step are the same on every launch and every rank of a replica."""
    bins: List[List[int]] = []
    room: List[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        k = next((k for k, r in enumerate(room) if r >= n), None)
        if k is None:
            bins.append([i])
            room.append(max_tokens - n)
        else:
            bins[k].append(i)
            room[k] -= n
    return [sorted(b) for b in bins]


def packed_layout(rows: List[List[int]], width: int, device=None):
    """Sequences of the given lengths laid end to end in rows of `width` positions (each row's tail
    is a padding segment of its own): (segment ids [R, width], gather [n, S]: for sequence k (in row
    order) and position t < its length, its place in the flattened rows; R·width (a spare slot) past
    its end; S = the longest, cu_seqlens [n + 1] int32 of the first row's sequences (THD, one row))."""
    lengths = [n for row in rows for n in row]
    seg = torch.empty(len(rows), width, dtype=torch.long)
    starts, k = [], 0
    for r, row in enumerate(rows):
        off = 0
        for n in row:
            seg[r, off:off + n] = k
            starts.append(r * width + off)
            off, k = off + n, k + 1
        seg[r, off:] = len(lengths) + r  # padding: a segment of its own, attending only to itself
    lens = torch.tensor(lengths, dtype=torch.long)
    pos = torch.arange(max(lengths))
    gather = torch.where(pos[None] < lens[:, None], torch.tensor(starts)[:, None] + pos[None],
                         torch.full_like(pos[None], len(rows) * width))
    cu = torch.tensor([0] + list(itertools.accumulate(rows[0])), dtype=torch.int32)
    return seg.to(device), gather.to(device), cu.to(device)


def _buckets(sizes, bucket_bytes: int) -> List[List[int]]:
    """Consecutive indices grouped into buckets of at most bucket_bytes (a larger item alone) and
    one dtype each; sizes: [(nbytes, dtype)]."""
    buckets: List[List[int]] = []
    size = 0
    for i, (nbytes, dtype) in enumerate(sizes):
        if not buckets or size + nbytes > bucket_bytes or sizes[buckets[-1][0]][1] != dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += nbytes
    return buckets


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
        if spec.is_moe:
            self._moe_setup()
        self.steps_done = 0
        self.skipped_steps = 0
        self._computed = self._real = 0
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

    def _chunk_layer_base(self, i: int) -> int:
        vpp = self.cfg.virtual_pipeline_model_parallel_size
        return layer_offset(self.spec, self.pp_rank, self.pp_size, i if vpp else None, vpp)

    def load_hf_state_dict(self, hf: Dict[str, torch.Tensor]) -> None:
        """Loads full HF-named tensors (every rank holds them; small models and tests). Experts in
        checkpoint names or fused as transformers keeps them in memory."""
        vpp = self.cfg.virtual_pipeline_model_parallel_size
        hf = unfuse_hf_experts(hf)
        moe = dict(ep_rank=self.ep_rank, ep=self.ep, etp_rank=self.etp_rank, etp=self.etp) if self.spec.is_moe else {}
        for i, chunk in enumerate(self.chunks):
            sd = hf_to_megatron(hf, self.spec, self.tp_rank, self.cfg.tensor_model_parallel_size, self.pp_rank,
                                self.pp_size, i if vpp else None, vpp, layer_spec=self.layer_spec, **moe)
            own = chunk.module.state_dict()
            missing = [k for k in own if not k.endswith("_extra_state") and k not in sd]
            if missing:
                raise KeyError(f"HF state dict lacks tensors for {missing[:5]}")
            with torch.no_grad():
                for k, v in sd.items():
                    if k not in own:
                        raise KeyError(f"unexpected parameter {k}")
                    if tuple(own[k].shape) != tuple(v.shape):
                        raise ValueError(f"{k}: shape {tuple(v.shape)} from HF, {tuple(own[k].shape)} in the model")
                    own[k].copy_(v)
        with dev.megatron_scope():
            self.optimizer.reload_model_params()

    def _named_tp_merged_parameters(self, bucket_bytes: int = 64 * 2**20):
        """(chunk layer base, Megatron name, TP-merged tensor) for this PP stage's parameters; the
        experts' weights are merged over the expert-TP group and gathered over the EP group in
        buckets of up to `bucket_bytes` per rank (one all-gather each): every EP rank yields every
        expert, under its global index."""
        tp = self.cfg.tensor_model_parallel_size
        pending: List[tuple] = []  # (chunk layer base, name, local index, tensor) of experts not yet gathered

        def flush():
            yield from self._gather_experts(pending)
            pending.clear()

        for i, chunk in enumerate(self.chunks):
            for name, p in chunk.module.state_dict().items():
                if name.endswith("_extra_state"):
                    continue
                t = p.detach()
                local = expert_index(name) if self.spec.is_moe else None
                size, group = (self.etp, self.etp_group) if local is not None else (tp, self.tp_group)
                if size > 1 and param_kind(name) != "replicated":
                    parts = [torch.empty_like(t) for _ in range(size)]
                    dist.all_gather(parts, t.contiguous(), group=group)
                    t = merge_tp(name, parts)
                if local is None:
                    yield self._chunk_layer_base(i), name, t
                    continue
                if pending and (sum(x[3].numel() * x[3].element_size() for x in pending) + t.numel() * t.element_size()
                                > bucket_bytes or pending[0][3].dtype != t.dtype):
                    yield from flush()
                pending.append((self._chunk_layer_base(i), name, local, t))
        yield from flush()

    def _gather_experts(self, items: List[tuple]):
        """One flat all-gather over the EP group for a bucket of expert tensors (the same names on
        every EP rank: local numbering), then each expert under its global index."""
        if not items:
            return
        per = self.spec.num_experts // self.ep
        if self.ep == 1:
            for base, name, local, t in items:
                yield base, name, t
            return
        flat = torch.cat([t.reshape(-1) for *_, t in items]).contiguous()
        parts = [torch.empty_like(flat) for _ in range(self.ep)]
        dist.all_gather(parts, flat, group=self.ep_group)
        numels = [t.numel() for *_, t in items]
        pieces = [part.split(numels) for part in parts]
        for k, (base, name, local, t) in enumerate(items):
            for r in range(self.ep):
                yield base, with_expert_index(name, r * per + local), pieces[r][k].view(t.shape)

    def _stage_hf_tensors(self, bucket_bytes: int = 64 * 2**20):
        """(HF name, tensor) of this PP stage's parameters, TP-merged, on the device."""
        for base, name, t in self._named_tp_merged_parameters(bucket_bytes):
            yield from megatron_state_to_hf([(name, t)], self.spec, base)

    def hf_weights(self, bucket_bytes: int = 64 * 2**20):
        """The one walk of the weights: every rank yields the complete HF-named set in a fixed order,
        one tensor at a time, on the device. TP shards are all-gathered and merged (fused QKV per KV
        group, [gate; up], row/column splits, vocabulary padding removed); MoE experts are merged over
        expert-TP and all-gathered over EP in buckets of at most `bucket_bytes`; with PP each stage
        broadcasts its tensors to the others in buckets of at most `bucket_bytes`, so the peak extra
        memory is one bucket plus one merged parameter. Used by the weight sync and the export."""
        if self.pp_size == 1:
            yield from self._stage_hf_tensors(bucket_bytes)
            return
        for stage in range(self.pp_size):
            src = dist.get_global_rank(self.pp_group, stage)
            local = list(self._stage_hf_tensors(bucket_bytes)) if self.pp_rank == stage else None
            meta = [[(n, tuple(t.shape), t.dtype) for n, t in local] if local is not None else None]
            dist.broadcast_object_list(meta, src=src, group=self.pp_group)
            for bucket in _buckets([(torch.Size(s).numel() * torch.empty((), dtype=d).element_size(), d)
                                    for _, s, d in meta[0]], bucket_bytes):
                dtype = meta[0][bucket[0]][2]
                numels = [torch.Size(meta[0][i][1]).numel() for i in bucket]
                if local is not None:
                    flat = torch.cat([local[i][1].reshape(-1).to(dtype) for i in bucket]).contiguous()
                else:
                    flat = torch.empty(sum(numels), dtype=dtype, device=self.device)
                dist.broadcast(flat, src=src, group=self.pp_group)
                for i, part in zip(bucket, flat.split(numels)):
                    name, shape, _ = meta[0][i]
                    yield name, part.view(shape)
                del flat

    def check_finite(self) -> None:
        """Raises on every rank if any rank's parameters hold inf/NaN. One device-side flag and one
        host sync, whatever the number of parameters."""
        bad = torch.zeros(1, device=self.device)
        for chunk in self.chunks:
            for p in chunk.module.parameters():
                bad = torch.maximum(bad, (~torch.isfinite(p.detach())).any().float().reshape(1))
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            raise ValueError("policy weights hold non-finite values; the engine keeps its previous weights")

    def hf_state_dict(self) -> Dict[str, torch.Tensor]:
        """The full model under HF names on every rank, as host copies (tests, export)."""
        return {name: t.cpu().clone() for name, t in self.hf_weights()}

    # ---- passes -------------------------------------------------------------------------------

    @property
    def packing(self) -> bool:
        return self.cfg.max_tokens_per_micro_batch > 0

    def take_routing_mismatch(self) -> Optional[float]:
        """Routing replay: the share of (real token, MoE layer) pairs whose experts the trainer's own
        router would have chosen differently from the rollout's (over all ranks) since the last call;
        None without replayed passes."""
        if not self.spec.is_moe or not self.cfg.routing_replay:
            return None
        d = self._replay_diff.clone()
        dist.all_reduce(d)  # a ratio: replicas (TP without SP) count both parts alike
        self._replay_diff.zero_()
        return float(d[0] / d[1]) if d[1] > 0 else None

    def take_token_counts(self) -> Dict[str, float]:
        """Tokens the passes computed (padding included) and real tokens, since the last call."""
        out = {"tokens_computed": float(self._computed), "tokens_real": float(self._real)}
        self._computed = self._real = 0
        return out

    def _micro_batches(self, batch: PolicyBatch) -> List[dict]:
        """Micro-batches of `micro_batch_size` padded rows, or with `max_tokens_per_micro_batch`
        packed rows of whole sequences end to end, attention within each: with the local spec rows
        as wide as the longest sequence and a block-diagonal mask, as many rows as the budget holds;
        with TE one row of up to the budget and THD packed-sequence parameters. Every micro-batch keeps
        its sequences' loss inputs in the per-sequence layout (`batch`, cut to their longest) and
        the rows they came from; `_logprobs` hands the loss per-sequence tensors either way."""
        if batch.segment_ids is not None and self.layer_spec == "te":
            # TE's attention with the causal mask type ignores an explicit mask: caller-packed rows
            # would attend across segments (the policy's own packing passes THD parameters instead).
            raise NotImplementedError("caller-packed rows (segment_ids) with model.layer_spec=te: not supported; use "
                                      "train.max_tokens_per_micro_batch (the policy packs) or the local spec")
        lengths = sequence_lengths(batch.loss_mask).tolist()
        self._real += sum(lengths)
        if self.packing and batch.segment_ids is None:
            budget = self.cfg.max_tokens_per_micro_batch
            if self.layer_spec == "te":  # one row of up to `budget` tokens: THD attention costs Σ L²
                groups = [[row] for row in pack_sequences(lengths, budget)]
            else:  # rows as wide as the longest sequence (attention costs rows × width², as padded)
                width = max(lengths)
                rows = pack_sequences(lengths, width)
                per = max(1, budget // width)
                groups = [rows[i:i + per] for i in range(0, len(rows), per)]
            return [self._packed(batch, group, lengths) for group in groups]
        mbs, out = self.cfg.micro_batch_size, []
        for start in range(0, num_micro_batches(batch.size, mbs) * mbs, mbs):
            part = batch.select(slice(start, start + mbs)).to(self.device)
            # TE's causal attention implies the mask: no [b, 1, s, s] tensor per micro-batch (150 MB at 12k tokens)
            position_ids, mask, labels = model_inputs(part.input_ids, part.segment_ids,
                                                      with_mask=self.layer_spec == "local")
            self._computed += part.input_ids.numel()
            padding = None
            if self.spec.is_moe:  # the router's padding mask, from the lengths computed above
                ends = torch.tensor(lengths[start:start + mbs], device=self.device)
                padding = torch.arange(part.input_ids.shape[1], device=self.device)[None] >= ends[:, None]
            out.append(dict(batch=part, input_ids=part.input_ids, position_ids=position_ids, attention_mask=mask,
                            labels=labels, rows=torch.arange(start, start + mbs), gather=None, padding=padding,
                            routing=part.routing))
        return out

    def _packed(self, batch: PolicyBatch, group: List[List[int]], lengths: List[int]) -> dict:
        """One micro-batch of packed rows; `group` lists each row's sequence indices."""
        order = [i for row in group for i in row]
        row_lengths = [[lengths[i] for i in row] for row in group]
        width = max(sum(r) for r in row_lengths)
        width = -(-width // self.width_multiple) * self.width_multiple
        idx = torch.tensor(order, dtype=torch.long)
        part = batch.select(idx).to(self.device)
        part = part._map(lambda t: t if t.dim() == 1 else t[:, :max(lengths[i] for i in order)])
        seg, gather, cu = packed_layout(row_lengths, width, self.device)
        ids = torch.zeros(len(group) * width, dtype=part.input_ids.dtype, device=self.device)
        valid = gather < ids.numel()
        ids[gather[valid]] = part.input_ids[:, :gather.shape[1]][valid]
        ids = ids.view(len(group), width)
        self._computed += ids.numel()
        mb = dict(batch=part, input_ids=ids, rows=idx, gather=gather, padding=seg >= len(order))
        if part.routing is not None:  # the rollout's experts, laid out like the tokens
            r = part.routing
            flat = r.new_full((len(group) * width + 1,) + tuple(r.shape[2:]), -1)
            flat[gather[valid]] = r[:, :gather.shape[1]][valid]
            mb["routing"] = flat[:-1].view(len(group), width, *r.shape[2:])
        if self.layer_spec == "te":  # GPU: THD, no mask tensor (tools/gpu_selftest.py checks it against padded rows)
            from megatron.core.packed_seq_params import PackedSeqParams

            if width > cu[-1]:  # the padding tail: a segment of its own
                cu = torch.cat([cu, torch.tensor([width], dtype=torch.int32, device=self.device)])
            longest = int((cu[1:] - cu[:-1]).max())
            position_ids, _, labels = model_inputs(ids, seg, with_mask=False)
            mb.update(position_ids=position_ids, attention_mask=None, labels=labels,
                      packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                        max_seqlen_q=longest, max_seqlen_kv=longest))
        else:
            position_ids, mask, labels = model_inputs(ids, seg)
            mb.update(position_ids=position_ids, attention_mask=mask, labels=labels)
        return mb

    def _run(self, micro: List[dict], loss_fn, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            extra = {"packed_seq_params": mb["packed_seq_params"]} if mb.get("packed_seq_params") is not None else {}
            if self.spec.is_moe:  # padding is neither routed into the load statistics nor the aux losses
                extra["padding_mask"] = mb["padding"]
            if self.cfg.routing_replay:
                self._replay(model, mb.get("routing"))
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
        batch = self._fit_width(batch).to(self.device)
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

        micro = self._micro_batches(batch)
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

    def _fit_width(self, batch: PolicyBatch) -> PolicyBatch:
        width = batch.input_ids.shape[1]
        return batch.pad_width(-(-width // self.width_multiple) * self.width_multiple)

    # ---- MoE: routing replay -----------------------------------------------------------------

    def _replay(self, model, routing: Optional[torch.Tensor]) -> None:
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
        k = self.spec.moe_top_k
        idx = routing.to(self.device, torch.long).transpose(0, 1)  # [s, b, layers, k]
        if self.config.sequence_parallel:
            idx = idx.chunk(self.cfg.tensor_model_parallel_size, dim=0)[self.tp_rank]
        recorded = (idx >= 0).all(-1)  # [s, b, layers]
        idx = torch.where(idx < 0, torch.arange(k, device=self.device), idx)
        for router in routers:
            replay = router.router_replay
            replay.clear_indices()
            layer = router.layer_number - 1
            replay.set_target_indices(idx[:, :, layer].reshape(-1, k).contiguous())
            replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
            replay.recorded = recorded[:, :, layer].reshape(-1)  # for the mismatch metric

    # ---- MoE: the auxiliary losses' weight, their values per layer, the expert load -------------

    def _moe_setup(self) -> None:
        """Counts tokens per expert in training passes (a hook on each router; padding excluded)."""
        self._aux_coef = self.config.moe_aux_loss_coeff
        self._z_coef = self.config.moe_z_loss_coeff
        self._load = torch.zeros(self.spec.num_layers, self.spec.num_experts, dtype=torch.float64, device=self.device)

        self._replay_diff = torch.zeros(2, dtype=torch.float64, device=self.device)  # (tokens routed apart, tokens)

        def count(router, inputs, output):
            padding = inputs[1] if len(inputs) > 1 and inputs[1] is not None else None
            real = None if padding is None else ~padding.transpose(0, 1).reshape(-1).bool()
            if router.training:
                routing_map = output[1] if real is None else output[1] & real[:, None]
                self._load[router.layer_number - 1] += routing_map.sum(0).double()
            replay = getattr(router, "router_replay", None)
            if replay is not None and replay.router_replay_action is not None and replay.target_topk_idx is not None:
                with torch.no_grad():  # what the router would have chosen: the mismatch replay removed
                    own = router.gating(inputs[0].reshape(-1, inputs[0].shape[-1])).topk(self.spec.moe_top_k, -1).indices
                    apart = (own.sort(-1).values != replay.target_topk_idx.sort(-1).values).any(-1)
                    apart = apart[replay.recorded if real is None else replay.recorded & real]
                    self._replay_diff += torch.stack([apart.sum(), torch.tensor(apart.numel(), device=apart.device)]).double()

        from megatron.core.transformer.moe.router import Router

        for chunk in self.chunks:
            for module in chunk.module.modules():
                if isinstance(module, Router):
                    module.register_forward_hook(count)

    def _moe_begin(self, batch: PolicyBatch) -> None:
        """Megatron scales each micro-batch's aux/z loss by its routed tokens, and the step divides
        every gradient by the loss's count (calculate_per_token_loss: response tokens for
        token-mean, sequences for seq-mean): the coefficient would weigh the aux loss by (real
        tokens / count), which varies with prompt lengths and the aggregation. Scaled here by count
        / real tokens (global), the objective is: the policy loss + coefficient × the
        real-token-weighted mean of the micro-batches' aux losses, under every TP/PP/EP layout,
        aggregation and prompt share. (Megatron's load-balancing loss is a per-micro-batch
        statistic: a different split into micro-batches changes its value, not its weight.)"""
        counts = torch.stack([self.loss.normalizer(batch.loss_mask), sequence_lengths(batch.loss_mask).sum()])
        counts = counts.double().to(self.device)
        dist.all_reduce(counts, group=self.dp_group)
        scale = float(counts[0] / counts[1].clamp(min=1))
        self.config.moe_aux_loss_coeff = self._aux_coef * scale
        if self._z_coef:
            self.config.moe_z_loss_coeff = self._z_coef * scale
        self._load.zero_()

    def _moe_end(self, n_micro: int) -> Dict[str, float]:
        """moe_<loss> (mean over layers and micro-batches, every rank) and moe_<loss>_layer<i>;
        tokens per expert over the step (min, max, and max / mean)."""
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

        # each layer lives on one stage; every DP replica computed it; under sequence parallelism each
        # TP rank computed its slice's share (the tokens per expert are reduced over TP), else all of it
        world, tp = dist.get_world_size(), self.cfg.tensor_model_parallel_size
        replicas = world // self.pp_size // (tp if self.config.sequence_parallel else 1)
        out: Dict[str, float] = {}
        for name, entry in sorted(get_moe_layer_wise_logging_tracker().items()):
            values = entry["values"].detach().double().clone()
            dist.all_reduce(values)
            values /= replicas * n_micro
            short = {"load_balancing_loss": "moe_aux_loss", "z_loss": "moe_z_loss"}.get(name, f"moe_{name}")
            out[short] = float(values.mean())
            out.update({f"{short}_layer{i}": float(v) for i, v in enumerate(values.tolist())})
        clear_aux_losses_tracker()
        load = self._load.clone()
        dist.all_reduce(load)  # sum over replicas; tokens are replicated over TP without SP
        if self.cfg.tensor_model_parallel_size > 1 and not self.config.sequence_parallel:
            load /= self.cfg.tensor_model_parallel_size
        mean = load.mean().clamp(min=1e-9)
        out.update(moe_tokens_per_expert_min=float(load.min()), moe_tokens_per_expert_max=float(load.max()),
                   moe_load_imbalance=float(load.max() / mean))
        return out

    def train_step(self, batch: PolicyBatch) -> Dict[str, float]:
        """One optimizer step on this rank's share of a mini-batch (split into micro-batches)."""
        self.loss.check(batch.inputs)
        t0 = time.perf_counter()
        batch = self._fit_width(batch)

        def loss_fn(mb, logits):
            b: PolicyBatch = mb["batch"]
            logp, ent = self._logprobs(mb, logits)
            loss_sum, count, sums = self.loss(logp, ent, b.loss_mask, b.inputs)
            return loss_sum, count.to(torch.int), sums

        with dev.megatron_scope():
            for c in self.chunks:
                c.zero_grad_buffer()
            self.optimizer.zero_grad()
        if self.spec.is_moe:
            self._moe_begin(batch)
        micro = self._micro_batches(batch)
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
        if self.spec.is_moe:
            metrics.update(self._moe_end(len(micro)))
        metrics.update(grad_norm=float("nan") if grad_norm is None else float(grad_norm), skipped=float(skipped),
                       lr=self.optimizer.param_groups[0]["lr"],
                       tokens_per_s=metrics["tokens"] / max(time.perf_counter() - t0, 1e-9))
        return metrics
