"""rollout.placement=separate: engines on their own ranks, the trainer on the others, one launch.

The launch's last `rollout.engine_ranks` ranks host only engines (whole inference-TP groups), the
first ones only train (`training.parallel.init_roles`). Trainer rank 0 talks to the engine ranks
over three bridge groups: it broadcasts messages (headers) and weight buckets to every engine rank,
and engine rank 0 sends it rollouts, evaluation results and errors. Each side keeps one thread per
direction it receives or sends in, so neither side's compute waits for the other's to post a
receive:

    trainer ranks                                    engine ranks
    policy.hf_weights ─ buckets (weights group) ──▶  inbox thread: stages a whole version
    trainer 0: hello / version / eval / stop ──────▶  (messages group, in order)
    trainer 0's mailbox thread ◀── batch / group / eval_result / error / bye ── engine 0's outbox thread

Versions. Version v is the weights after v updates, shipped with the entropy statistics the trainer
computed from the batch that produced them (docs/HAPO.md "Across policy versions"): a token sampled
under v takes its temperature from those statistics. An engine applies a version whole, between
two generation steps, never half of one (a version is staged complete by the inbox thread before
the engine sees it; an incomplete one is dropped with the connection).

Schedules (`rollout.max_staleness` N, `rollout.partial`):
- lockstep (partial off): the engine generates step s's batch (dynamic sampling included) under
  version max(0, s − 1 − N) exactly, so results do not depend on which side is faster. N = 0 is
  the synchronous schedule on separate ranks; N = 1 is one step off policy (step k+1's rollout runs
  while step k trains). A checkpoint after step k keeps the batches k+1 … k+N already made for
  it, so a resumed run is bit-identical.
- streaming (partial on): the engine streams groups as they finish; a new version is applied
  between decoding steps and the requests in flight are continued under it (`rollout/stream.py`);
  the trainer takes groups in arrival order. `rollout.stale`: wait (the engine admits a prompt
  only while at most (N + 1) × prompts_per_step groups are ahead of the trainer's consumption, so
  no token is ever more than N versions behind the update that uses it) or drop (admission by
  version, groups whose oldest token is more than N versions behind are dropped and counted).
"""
from __future__ import annotations

import collections
import os
import pickle
import queue
import signal
import threading
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .. import device as dev
from ..algorithms import EntropyStats
from ..metrics import progress_bar
from ..training import stop as phases
from .collect import GroupSummary, Layout, RolloutCollector

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


class _Pump(threading.Thread):
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


def _receive_message(roles, device):
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


# ---- the engine ranks -----------------------------------------------------------------------------------

class EngineWorker:
    """What an engine rank runs instead of training: builds its share of the engines from the model
    folder the trainer names, then serves the schedule until trainer 0 says stop. SIGTERM is ignored
    here (the trainer's graceful stop saves first, then stops the engines); a lost trainer ends the
    worker with an error, so no engine rank outlives its job."""

    def __init__(self, cfg, roles):
        from ..training.parallel import control_group
        from .assemble import rollout_side, run_inputs

        self.cfg, self.roles = cfg, roles
        r, itp = cfg.rollout, cfg.parallel.inference_tensor_parallel_size
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % itp:
            raise ValueError(f"rollout.engine_ranks={world}: not a multiple of parallel.inference_tensor_parallel_size={itp}")
        engines = world // itp
        if r.prompts_per_step % engines:
            raise ValueError(f"rollout.prompts_per_step={r.prompts_per_step} does not divide over the {engines} engines of "
                             f"rollout.engine_ranks={world} / inference_tensor_parallel_size={itp}")
        if r.partial and engines > 1:
            raise ValueError(f"rollout.partial: one engine only for now (rollout.engine_ranks={world} with "
                             f"inference_tensor_parallel_size={itp} makes {engines})")
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the trainer stops us, after its checkpoint
        self.leader = roles.batches is not None
        self._pending: "collections.deque[dict]" = collections.deque()
        self.idle_s = self.busy_s = 0.0
        self.inbox = _Pump("engine-inbox", receive=_receive_message(roles, dev.device()))
        self.inbox.start()
        self.outbox = _Pump("engine-outbox", send=lambda m: send_obj(roles.batches, m, 0), last="bye") \
            if self.leader else None
        if self.outbox is not None:
            self.outbox.start()
        try:
            hello = self._take()
            if hello["kind"] != "hello":
                raise RuntimeError(f"engine ranks: expected the trainer's hello, got {hello['kind']!r}")
            self.inputs = run_inputs(cfg, hello["model_dir"])
            self.control = control_group()
            self.layout = Layout(world, rank, engines, rank // itp, rank % itp == 0, 1, 0)
            self.engine, self.rewards, self.collector, self.sampling = rollout_side(cfg, self.inputs, self.layout,
                                                                                    self.control)
        except BaseException as exc:
            self._fail(exc)
            raise
        self.version, self.stats = -1, None

    # ---- messages -------------------------------------------------------------------------------------

    def _take(self, block: bool = True) -> Optional[dict]:
        """The next message in the trainer's order (None when none is there and block is off)."""
        if self._pending:
            return self._pending.popleft()
        try:
            msg = self.inbox.inbox.get(block=block)
        except queue.Empty:
            return None
        if msg["kind"] == "lost":
            raise RuntimeError(f"engine ranks: the trainer is gone ({msg['error']}); stopping")
        return msg

    def drain(self) -> None:
        """Everything the inbox holds into the pending queue, without waiting."""
        while True:
            try:
                msg = self.inbox.inbox.get_nowait()
            except queue.Empty:
                return
            if msg["kind"] == "lost":
                raise RuntimeError(f"engine ranks: the trainer is gone ({msg['error']}); stopping")
            self._pending.append(msg)

    def _peek(self, block: bool) -> Optional[dict]:
        if not self._pending:
            t0 = time.perf_counter()
            msg = self._take(block)
            if block:
                self.idle_s += time.perf_counter() - t0
            if msg is None:
                return None
            self._pending.append(msg)
        return self._pending[0]

    def _send(self, msg: dict) -> None:
        if self.outbox is not None:
            self.outbox.outbox.put(msg)

    def _apply(self, msg: dict) -> None:
        """A whole version into the engine (checked first: names, shapes, finite; a refused one stops
        the run, the engine keeps its weights), and its statistics for the temperature."""
        t0 = time.perf_counter()
        self.engine.update_weights(msg["tensors"])
        self.version = msg["version"]
        self.stats = EntropyStats.from_dict(msg["stats"]) if msg.get("stats") else None
        self.busy_s += time.perf_counter() - t0

    # ---- serving ------------------------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        """Tells the trainer why (engine 0), and waits until it is sent."""
        self._send({"kind": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        self._bye()

    def _bye(self) -> None:
        """The last message to the trainer, sent before this returns."""
        self._send({"kind": "bye"})
        if self.outbox is not None:
            self.outbox.outbox.put(None)
            self.outbox.join(timeout=60)

    def serve(self) -> None:
        try:
            first = self._take()
            if first["kind"] == "stop":
                return
            if first["kind"] != "version" or "start" not in first:
                raise RuntimeError(f"engine ranks: expected the first version, got {first['kind']!r}")
            self._apply(first)
            start = first["start"]
            if self.cfg.rollout.partial:
                from .stream import StreamingSchedule

                StreamingSchedule(self, start).run()
            else:
                self._lockstep(start["step"], start["data_position"])
        except BaseException as exc:
            self._fail(exc)
            raise
        self._bye()

    def handle(self, msg: dict) -> bool:
        """An evaluation request or a stop (True: stop now)."""
        if msg["kind"] == "eval":
            self._evaluate(msg)
            return False
        if msg["kind"] == "stop":
            return True
        raise RuntimeError(f"engine ranks: unexpected message {msg['kind']!r}")

    def agreed_pending(self, block: bool) -> int:
        """How many of the trainer's messages to act on now, the same on every engine rank (they run
        collectives together: one rank evaluating while another generates would pair the wrong
        collectives): each rank counts what it holds (block: waits for one first), all take the
        smallest count. Messages arrive in the same order everywhere."""
        if block:
            self._peek(block=True)
        self.drain()
        count = torch.tensor([len(self._pending)], dtype=torch.long)
        if self.layout.world > 1:
            dist.all_reduce(count, op=dist.ReduceOp.MIN, group=self.control)
        return int(count)

    def _lockstep(self, step: int, position: int) -> None:
        n = self.cfg.rollout.max_staleness
        while True:
            need = step - 1 - n  # the version step s's batch is generated under (the one it holds, at start)
            while True:
                for _ in range(self.agreed_pending(block=self.version < need)):
                    head = self._pending[0]
                    if head["kind"] == "version" and head["version"] > self.version and self.version >= need:
                        break  # a newer version waits: this batch belongs to the one held
                    msg = self._take()
                    if msg["kind"] == "version":
                        self._apply(msg)  # the next version, or the held one again (a re-sync)
                    elif self.handle(msg):
                        return
                if self.version >= need:
                    break
            position = self._generate_step(step, position)
            step += 1

    def _generate_step(self, step: int, position: int) -> int:
        t0 = time.perf_counter()
        phases.set_step(step)
        phases.mark("rollout")
        r, adaptive = self.cfg.rollout, self.cfg.algorithm.adaptive_temperature
        kept, seen, local, gen_batches, after = self.collector.gather_groups(
            position, self.inputs.sampler, self.inputs.train_data, self.sampling, r, self.stats if adaptive else None,
            progress_bar(False, "", 0))
        wanted = {g.position for g in kept}
        for g in local.values():
            for s in g.samples:
                s.versions = np.full(len(s.token_ids), self.version, dtype=np.int32)
        parts = [None] * self.layout.world if self.layout.rank == 0 else None
        dist.gather_object([g for p, g in local.items() if p in wanted], parts, dst=0, group=self.control)
        self.busy_s += time.perf_counter() - t0
        if self.layout.rank == 0:
            groups = {g.position: g for part in parts for g in part}
            self._send({"kind": "batch", "step": step, "version": self.version, "data_position": after,
                        "kept": kept, "seen": seen, "groups": groups, "gen_batches": gen_batches,
                        **self.take_times(), "time_generate": time.perf_counter() - t0})
        return after

    def take_times(self) -> Dict[str, float]:
        out = {"engine_idle_s": self.idle_s, "engine_busy_s": self.busy_s}
        self.idle_s = self.busy_s = 0.0
        return out

    def _evaluate(self, msg: dict) -> None:
        from .engine import SamplingConfig

        t0 = time.perf_counter()
        sampling = SamplingConfig.for_eval(self.cfg.eval, self.cfg.rollout.max_response_tokens, self.inputs.stop_ids)
        groups = self.collector.evaluate(self.inputs.eval_data, msg["count"], sampling, msg["n"], progress_bar(False, "", 0))
        self.busy_s += time.perf_counter() - t0
        self._send({"kind": "eval_result", "id": msg["id"], "version": self.version, "groups": groups})

    def close(self) -> None:
        if self.rewards is not None:
            self.rewards.close()
        self.engine.close()


# ---- the trainer ranks ------------------------------------------------------------------------------------

class RemoteRollout:
    """The trainer's side: the same collect / evaluate calls as colocated engines, answered by the
    engine ranks. Every trainer rank holds one (the weight walk and the exchange to data-parallel
    ranks are collective); trainer 0 alone talks to the engines."""

    def __init__(self, cfg, roles, model_dir: str, layout: Layout, control):
        self.cfg, self.roles, self.control = cfg, roles, control
        self.leader = roles.messages is not None
        self.collector = RolloutCollector(None, None, 0.0, None, layout, control, cfg.train.seed)
        self.mail: Dict[Tuple[str, int], dict] = {}  # (kind, step or id) → message, on trainer 0
        self.engine_position = 0  # the data position after the last rollout received (where a resume restarts)
        self.closed, self.failed, self._eval_id, self.started = False, None, 0, False
        self.pump = None
        self.stream = None  # partial rollouts: the groups received and not yet used, in arrival order
        if self.leader:
            self.pump = _Pump("trainer-mailbox", receive=lambda: recv_obj(roles.batches, 1), last="bye")
            self.pump.start()
            try:
                broadcast_obj(roles.messages, {"kind": "hello", "model_dir": model_dir})
            except RuntimeError as exc:
                self._explain(exc)
                raise

    # ---- start, weights ----------------------------------------------------------------------------------

    def start(self, policy, version: int, stats, state: Optional[dict], data_position: int = 0) -> Dict[str, float]:
        """The first version (the loaded or resumed weights) with where the engines start: the step
        after the rollouts a checkpoint kept (`state`, from `checkpoint_state`) and the data position
        after them; without such a state (a fresh run, or a checkpoint of a colocated run), the
        trainer's `data_position`."""
        self.engine_position, self.started = data_position, True
        start = {"step": version + 1, "data_position": data_position}
        if state:
            self.engine_position = state["engine_position"]
            kept = state.get("batches", {})
            if self.leader:
                self.mail.update({("batch", s): m for s, m in kept.items()})
            start = {"step": version + 1 + len(kept), "data_position": self.engine_position}
            if state.get("stream") is not None:
                self.stream = state["stream"]
                start.update(self.stream.start_info())
        if self.cfg.rollout.partial and self.stream is None:
            from .stream import TrainerStream

            self.stream = TrainerStream()
            self.stream.frontier = data_position
            start.update(self.stream.start_info())
        return self.sync(policy, version, stats, start)

    def sync(self, policy, version: int, stats, start: Optional[dict] = None) -> Dict[str, float]:
        header = {"kind": "version", "version": version, "stats": stats.to_dict() if stats is not None else None}
        if self.stream is not None:
            header["consumed"] = self.stream.told = self.stream.consumed
        if start is not None:
            header["start"] = start
        try:
            return send_weights(policy, self.roles, header)
        except RuntimeError as exc:
            self._explain(exc)
            raise

    def _explain(self, exc: Exception) -> None:
        """A send to the engines failed: raises the engines' own error where they sent one (they send
        it before they exit), else says they are gone."""
        if not self.leader or "Connection closed" not in str(exc) and "Connection reset" not in str(exc):
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                msg = self.pump.inbox.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            if msg["kind"] in ("error", "lost"):
                self.pump.inbox.put(msg)
                self._receive_one(block=True)  # raises with the engines' reason
        self.failed = {"kind": "lost"}
        raise RuntimeError(f"rollout.placement=separate: the engine ranks are gone ({exc})") from exc

    # ---- mail ---------------------------------------------------------------------------------------------

    def _wait(self, key: Tuple[str, int]) -> dict:
        while key not in self.mail:
            self._receive_one(block=True)
        return self.mail.pop(key)

    def _receive_one(self, block: bool) -> Optional[dict]:
        try:
            msg = self.pump.inbox.get(block=block)
        except queue.Empty:
            return None
        kind = msg["kind"]
        if kind in ("error", "lost"):
            self.failed = msg
            where = "the engine ranks failed" if kind == "error" else "the engine ranks are gone"
            raise RuntimeError(f"rollout.placement=separate: {where}: {msg['error']}"
                               + (f"\n{msg['traceback']}" if msg.get("traceback") else ""))
        if kind == "batch":
            self.mail[("batch", msg["step"])] = msg
        elif kind in ("group", "admitted"):
            self.stream.arrive(msg)
        elif kind == "eval_result":
            self.mail[("eval", msg["id"])] = msg
        elif kind == "bye":
            self.mail[("bye", 0)] = msg
        return msg

    def tell(self, msg: dict) -> None:
        """A message to every engine rank (trainer 0)."""
        try:
            broadcast_obj(self.roles.messages, msg)
        except RuntimeError as exc:
            self._explain(exc)
            raise

    def _share(self, obj):
        """Trainer 0's object on every trainer rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    # ---- rollouts -----------------------------------------------------------------------------------------

    def collect(self, step: int, cfg) -> Tuple[object, Dict[str, float]]:
        """Step `step`'s rollouts as this rank's RolloutBatch, and the step's schedule metrics (on
        every rank): the trainer's wait, the engine's generation time and idle share, staleness."""
        t0 = time.perf_counter()
        if self.stream is not None:
            meta, groups = self.stream.take(self, step, cfg) if self.leader else (None, None)
        else:
            msg = self._wait(("batch", step)) if self.leader else None
            groups = msg.pop("groups") if self.leader else None
            meta = msg
        wait = time.perf_counter() - t0
        meta = self._share(meta)
        meta["time_rollout_wait"] = wait
        self.engine_position = max(self.engine_position, meta["data_position"])
        batch = self.collector.build_batch(meta["kept"], meta["seen"], groups or {}, meta["gen_batches"])
        return batch, meta

    def schedule_metrics(self, meta: dict, step: int, batch) -> Dict[str, float]:
        """Staleness of the step's tokens (versions behind the weights the update starts from, step − 1),
        idle shares, the rollout's own time."""
        out = {"time_generate": meta["time_generate"], "time_rollout_wait": meta["time_rollout_wait"]}
        busy, idle = meta.get("engine_busy_s", 0.0), meta.get("engine_idle_s", 0.0)
        out["engine_idle_frac"] = idle / max(busy + idle, 1e-9)
        for k, v in meta.get("stream_metrics", {}).items():
            out[k] = v
        if "positions_seen" in meta:  # partial rollouts: the data positions this step consumed (JSONL only)
            out["positions_seen"] = meta["positions_seen"]
        counts = collections.Counter()
        span = 0
        for v in batch.versions or ():
            counts.update((step - 1 - v).tolist())
            if len(v):
                span = max(span, int(v.max() - v.min()))
        sums = torch.zeros(64, dtype=torch.float64)
        for k, c in counts.items():
            sums[min(k, 63)] += c
        dist.all_reduce(sums, group=self.control)
        total = float(sums.sum())
        if total:
            ks = torch.arange(64, dtype=torch.float64)
            out["staleness_mean"] = float((sums * ks).sum()) / total
            out["staleness_max"] = float(ks[sums > 0].max())
            for k in torch.nonzero(sums).flatten().tolist():
                out[f"staleness_tokens_{k}"] = float(sums[k])
        span_t = torch.tensor([float(span)])
        dist.all_reduce(span_t, op=dist.ReduceOp.MAX, group=self.control)
        out["versions_per_response_max"] = float(span_t) + 1.0 if total else 0.0
        return out

    def evaluate(self, count: int, n: int) -> List[GroupSummary]:
        self._eval_id += 1
        groups = None
        if self.leader:
            try:
                broadcast_obj(self.roles.messages, {"kind": "eval", "id": self._eval_id, "count": count, "n": n})
            except RuntimeError as exc:
                self._explain(exc)
                raise
            groups = self._wait(("eval", self._eval_id))["groups"]
        return self._share(groups)

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def checkpoint_state(self, step: int) -> dict:
        """What a resume needs to go on exactly (trainer 0's; the others return {}): lockstep, the
        rollouts already made for steps step+1 … step+N (waited for: the engines can make them under
        the versions they hold), so the resumed run trains on the same ones; streaming, the groups
        received and not used, and which positions are done."""
        if not self.leader:
            return {}
        if self.stream is not None:
            return {"engine_position": self.engine_position, "stream": self.stream.snapshot()}
        batches = {}
        for s in range(step + 1, step + 1 + self.cfg.rollout.max_staleness):
            batches[s] = self._wait(("batch", s))
            self.mail[("batch", s)] = batches[s]
        position = batches[max(batches)]["data_position"] if batches else self.engine_position
        return {"engine_position": position, "batches": batches}

    # ---- shutdown -------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stops the engine ranks and waits for their goodbye (rollouts made ahead are dropped)."""
        if self.closed:
            return
        self.closed = True
        if not self.leader or self.failed:
            return
        try:
            broadcast_obj(self.roles.messages, {"kind": "stop"})  # also before a start: the engines then just end
            deadline = time.monotonic() + float(os.environ.get("MEGATRON_HAPO_ENGINE_STOP_S", "600"))
            while ("bye", 0) not in self.mail and time.monotonic() < deadline:
                self._receive_one(block=True)
        except RuntimeError:
            pass  # the engines failed or are gone already: nothing left to stop
