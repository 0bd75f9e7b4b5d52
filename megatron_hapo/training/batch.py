"""The batch a policy pass reads, and its micro-batches: padded rows, or whole sequences packed
end to end under a token budget.

Contract: `PolicyBatch` holds one data-parallel rank's rows with every per-token tensor aligned to
label positions (entry t of a row scores token t+1; `loss_mask` marks the scored positions) and
the loss's inputs by name. `MicroBatcher.split` turns it into the micro-batches Megatron's
schedules consume; each keeps its sequences' loss inputs in the per-sequence layout (`batch`) and
where they sit in the model's rows (`rows`, `gather`), so losses see the same per-sequence tensors
whether rows are padded or packed. Nothing here touches the model or the optimizer.
"""
from __future__ import annotations

import itertools
from typing import List, Optional

import torch


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


class MicroBatcher:
    """Splits a batch into micro-batches for one policy: `micro_batch_size` padded rows, or with
    `max_tokens` > 0 packed rows (`pack_sequences`, `packed_layout`); widths rounded up to
    `width_multiple` (sequence parallelism). Counts the tokens it laid out (padding included) and
    the real ones, for the padding factor."""

    def __init__(self, micro_batch_size: int, max_tokens: int, layer_spec: str, device, width_multiple: int,
                 is_moe: bool):
        self.micro_batch_size, self.max_tokens, self.layer_spec = micro_batch_size, max_tokens, layer_spec
        self.device, self.width_multiple, self.is_moe = device, width_multiple, is_moe
        self.computed = self.real = 0

    @property
    def packing(self) -> bool:
        return self.max_tokens > 0

    def take_token_counts(self) -> dict:
        """Tokens computed (padding included) and real tokens since the last call."""
        out = {"tokens_computed": float(self.computed), "tokens_real": float(self.real)}
        self.computed = self.real = 0
        return out

    def fit_width(self, batch: "PolicyBatch") -> "PolicyBatch":
        width = batch.input_ids.shape[1]
        return batch.pad_width(-(-width // self.width_multiple) * self.width_multiple)

    def split(self, batch: PolicyBatch) -> List[dict]:
        """Micro-batches of `micro_batch_size` padded rows, or with `max_tokens_per_micro_batch`
        packed rows of whole sequences end to end, attention within each: with the local spec rows
        as wide as the longest sequence and a block-diagonal mask, as many rows as the budget holds;
        with TE one row of up to the budget and THD packed-sequence parameters. Every micro-batch keeps
        its sequences' loss inputs in the per-sequence layout (`batch`, cut to their longest) and
        the rows they came from; `MegatronPolicy._logprobs` hands the loss per-sequence tensors either way."""
        if batch.segment_ids is not None and self.layer_spec == "te":
            # TE's attention with the causal mask type ignores an explicit mask: caller-packed rows
            # would attend across segments (the policy's own packing passes THD parameters instead).
            raise NotImplementedError("caller-packed rows (segment_ids) with model.layer_spec=te: not supported; use "
                                      "train.max_tokens_per_micro_batch (the policy packs) or the local spec")
        lengths = sequence_lengths(batch.loss_mask).tolist()
        self.real += sum(lengths)
        if self.packing and batch.segment_ids is None:
            budget = self.max_tokens
            if self.layer_spec == "te":  # one row of up to `budget` tokens: THD attention costs Σ L²
                groups = [[row] for row in pack_sequences(lengths, budget)]
            else:  # rows as wide as the longest sequence (attention costs rows × width², as padded)
                width = max(lengths)
                rows = pack_sequences(lengths, width)
                per = max(1, budget // width)
                groups = [rows[i:i + per] for i in range(0, len(rows), per)]
            return [self._packed(batch, group, lengths) for group in groups]
        mbs, out = self.micro_batch_size, []
        for start in range(0, num_micro_batches(batch.size, mbs) * mbs, mbs):
            part = batch.select(slice(start, start + mbs)).to(self.device)
            # TE's causal attention implies the mask: no [b, 1, s, s] tensor per micro-batch (150 MB at 12k tokens)
            position_ids, mask, labels = model_inputs(part.input_ids, part.segment_ids,
                                                      with_mask=self.layer_spec == "local")
            self.computed += part.input_ids.numel()
            padding = None
            if self.is_moe:  # the router's padding mask, from the lengths computed above
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
        self.computed += ids.numel()
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
