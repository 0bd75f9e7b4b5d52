"""The bridge between trainer 0 and the engine ranks (rollout.placement=separate): message framing and
weight buckets over the bridge groups of `training.parallel.init_roles`, and the threads that own one
direction each, so neither side's compute waits for the other's to post a receive:

    trainer ranks                                    engine ranks
    policy.hf_weights ─ buckets (weights group) ──▶  inbox thread: stages a whole version
    trainer 0: hello / version / eval / stop ──────▶  (messages group, in order)
    trainer 0's mailbox thread ◀── batch / group / eval_result / error / bye ── engine 0's outbox thread

A version is staged complete by the engine's inbox thread before the engine sees it (an incomplete one
is dropped with the connection), so an engine applies a version whole or not at all.
"""
from __future__ import annotations

import pickle
import queue
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

BUCKET_BYTES = 64 * 2**20
_ALIGN = 16  # byte offset of each tensor in a bucket (any dtype's view of the flat buffer is aligned)


# ---- framing over the bridge groups ----------------------------------------------------------------

def _root(rank: int = 0):
    opts = dist.BroadcastOptions()
    opts.rootRank = rank
    return opts


def broadcast_obj(pg, obj: Any = None) -> Any:
    """Member 0 of `pg` sends `obj` to every other member (a length, then pickled bytes); the others
    pass nothing and get it."""
    root = pg.rank() == 0
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if root else None
    size = torch.tensor([len(payload) if root else 0], dtype=torch.long)
    pg.broadcast([size], _root()).wait()
    buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if root else torch.empty(int(size), dtype=torch.uint8)
    pg.broadcast([buf], _root()).wait()
    return obj if root else pickle.loads(buf.numpy().tobytes())


def send_obj(pg, obj: Any, dst: int) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    pg.send([torch.tensor([len(payload)], dtype=torch.long)], dst, 0).wait()
    pg.send([torch.frombuffer(bytearray(payload), dtype=torch.uint8)], dst, 1).wait()


def recv_obj(pg, src: int) -> Any:
    size = torch.zeros(1, dtype=torch.long)
    pg.recv([size], src, 0).wait()
    buf = torch.empty(int(size), dtype=torch.uint8)
    pg.recv([buf], src, 1).wait()
    return pickle.loads(buf.numpy().tobytes())


class Pump(threading.Thread):
    """A daemon thread that owns one direction of one bridge group: `receive()` until a message of
    kind `last`, each put on `inbox`; or sends what is put on `outbox`. A broken connection (the
    other side died) is put on the inbox as {"kind": "lost"}."""

    def __init__(self, name: str, receive=None, send=None, last: str = "stop", device=None):
        super().__init__(name=name, daemon=True)
        self.receive, self.send, self.last, self.device = receive, send, last, device
        self.inbox: "queue.Queue[dict]" = queue.Queue()
        self.outbox: "queue.Queue[Optional[dict]]" = queue.Queue()

    def run(self):
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        try:
            while True:
                if self.receive is not None:
                    msg = self.receive()
                    self.inbox.put(msg)
                else:
                    msg = self.outbox.get()
                    if msg is None:
                        return
                    self.send(msg)
                if msg.get("kind") == self.last:
                    return
        except BaseException as exc:  # noqa: BLE001 - the other side is gone: said to whoever waits
            self.inbox.put({"kind": "lost", "error": f"{type(exc).__name__}: {exc}"})


# ---- weights ------------------------------------------------------------------------------------------

def send_weights(policy, roles, header: dict, bucket_bytes: int = BUCKET_BYTES) -> Dict[str, float]:
    """Every trainer rank walks the policy's weights (`hf_weights`: TP-merged, EP-gathered,
    PP-streamed); trainer 0 broadcasts them to the engine ranks in buckets of about `bucket_bytes`
    (a header of names, shapes, dtypes and offsets on the messages group, then the flat bytes on the
    weights group: NCCL on GPU, gloo on CPU), then `header` (kind "version"), which commits them.
    Non-finite weights are refused before anything moves. Returns bytes and seconds."""
    t0 = time.perf_counter()
    policy.check_finite()
    leader = roles.messages is not None
    sent, parts, specs, size = 0, [], [], 0

    def flush():
        nonlocal parts, specs, size, sent
        if not specs:
            return
        flat = torch.cat(parts) if len(parts) > 1 else parts[0]
        broadcast_obj(roles.messages, {"kind": "bucket", "nbytes": int(flat.numel()), "specs": specs})
        roles.weights.broadcast([flat], _root()).wait()
        sent += int(flat.numel())
        parts, specs, size = [], [], 0

    for name, t in policy.hf_weights(bucket_bytes):
        if not leader:
            continue  # the walk is collective; only trainer 0 sends
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        pad = -raw.numel() % _ALIGN
        specs.append((name, tuple(t.shape), str(t.dtype).removeprefix("torch."), size, raw.numel()))
        parts.append(raw.clone())
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8, device=raw.device))
        size += raw.numel() + pad
        if size >= bucket_bytes:
            flush()
    if leader:
        flush()
        broadcast_obj(roles.messages, header)
    return {"weight_sync_bytes": float(sent), "weight_sync_s": time.perf_counter() - t0}


def receive_message(roles, device):
    """The engine side of the messages group: buckets are staged until their version's header
    arrives, which then carries them (`tensors`): a version is handed on whole or not at all."""
    staged: List[Tuple[str, torch.Tensor]] = []

    def receive():
        nonlocal staged
        while True:
            msg = broadcast_obj(roles.messages)
            if msg["kind"] != "bucket":
                break
            flat = torch.empty(msg["nbytes"], dtype=torch.uint8, device=device)
            roles.weights.broadcast([flat], _root()).wait()
            for name, shape, dtype, offset, nbytes in msg["specs"]:
                staged.append((name, flat[offset: offset + nbytes].view(getattr(torch, dtype)).view(shape)))
        if msg["kind"] == "version":
            msg["tensors"], staged = staged, []
        return msg

    return receive
