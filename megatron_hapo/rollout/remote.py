"""The trainer's side of rollout.placement=separate: a rollout source answered by the engine ranks
(`rollout/engine_rank.py`, the schedules there) over the bridge (`rollout/bridge.py`).

The launch's last `rollout.engine_ranks` ranks host only engines (whole inference-TP groups), the first
ones only train (`training.parallel.init_roles`). Trainer 0 sends the engines a hello (the model
folder), then versions (`PolicyVersion`: the weights after v updates with the statistics their tokens
take temperatures from), evaluation requests and the stop; engine 0 sends back batches (lockstep),
groups (streaming), evaluation results, its errors and its goodbye. What the engines had made ahead
is kept in the checkpoint (ROLLOUT_STATE), so a resumed run goes on exactly.
"""
from __future__ import annotations

import collections
import os
import queue
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..training import checkpoint as ckpt
from .assemble import run_inputs
from .bridge import Pump, broadcast_obj, recv_obj, send_weights
from .collect import GroupSummary, Layout, RolloutCollector
from .source import PolicyVersion, RolloutSource

ROLLOUT_STATE = "rollout_state.pkl"  # what the engines had made ahead, in the checkpoint


class RemoteRollout(RolloutSource):
    """The trainer's side: the rollout source's calls, answered by the engine ranks. Every trainer rank
    holds one (the weight walk and the exchange to data-parallel ranks are collective); trainer 0
    alone talks to the engines."""

    def __init__(self, cfg, roles, model_dir: str, control, dp: int, dp_rank: int):
        self.cfg, self.roles, self.control = cfg, roles, control
        self.leader = roles.messages is not None
        self.layout = Layout.for_rank(cfg, dist.get_world_size(), dist.get_rank(), dp, dp_rank, hosts_engine=False)
        self.collector = RolloutCollector(None, None, 0.0, None, self.layout, control, cfg.train.seed)
        self._state: Optional[dict] = None  # what a checkpoint kept for the engines (trainer 0)
        self.mail: Dict[Tuple[str, int], dict] = {}  # (kind, step or id) → message, on trainer 0
        self.engine_position = 0  # the data position after the last rollout received (where a resume restarts)
        self.closed, self.failed, self._eval_id, self.started = False, None, 0, False
        self.pump = None
        self.stream = None  # partial rollouts: the groups received and not yet used, in arrival order
        if self.leader:
            self.pump = Pump("trainer-mailbox", receive=lambda: recv_obj(roles.batches, 1), last="bye")
            self.pump.start()
            try:
                broadcast_obj(roles.messages, {"kind": "hello", "model_dir": model_dir})
            except RuntimeError as exc:
                self._explain(exc)
                raise
        self.inputs = run_inputs(cfg, model_dir)  # the engine ranks build their engines meanwhile

    # ---- the rollout source -------------------------------------------------------------------------------

    def restore(self, checkpoint: str) -> None:
        self._state = ckpt.read_blob(checkpoint, ROLLOUT_STATE) if self.leader else None

    def sync(self, policy, version: PolicyVersion, data_position: int = 0) -> Dict[str, float]:
        """As the current version again (the engines re-apply it); the first one starts them."""
        if not self.started:
            return self.start(policy, version, data_position)
        return self._sync(policy, version)

    def publish(self, policy, version: PolicyVersion) -> Dict[str, float]:
        return self._sync(policy, version)

    def collect(self, step: int, data_position: int, stats) -> Tuple[object, int, Dict[str, Any]]:
        batch, meta = self._collect(step, self.cfg.rollout)
        return batch, meta["data_position"], meta

    def step_metrics(self, record: Dict[str, Any], step: int, batch, row: Dict[str, Any]) -> Dict[str, float]:
        """The engines' side of the step, staleness, idle shares."""
        out = self.schedule_metrics(record, step, batch)
        out["trainer_idle_frac"] = out["time_rollout_wait"] / max(row["time_step"], 1e-9)
        out["rollout_tokens_per_s"] = row["response_tokens"] / max(out["time_generate"], 1e-9)
        return out

    def checkpoint_blobs(self, step: int) -> Dict[str, Any]:
        return {ROLLOUT_STATE: self.checkpoint_state(step)} if self.leader else {}

    # ---- start, weights ----------------------------------------------------------------------------------

    def start(self, policy, version: PolicyVersion, data_position: int) -> Dict[str, float]:
        """The first version (the loaded or resumed weights) with where the engines start: the step
        after the rollouts a checkpoint kept (`restore`, from `checkpoint_state`) and the data position
        after them; without such a state (a fresh run, or a checkpoint of a colocated run), the
        trainer's `data_position`. Only the first call sends anything."""
        if self.started:
            return {}
        self.engine_position, self.started, state = data_position, True, self._state
        start = {"step": version.number + 1, "data_position": data_position}
        if state:
            self.engine_position = state["engine_position"]
            kept = state.get("batches", {})
            if self.leader:
                self.mail.update({("batch", s): m for s, m in kept.items()})
            start = {"step": version.number + 1 + len(kept), "data_position": self.engine_position}
            if state.get("stream") is not None:
                self.stream = state["stream"]
                start.update(self.stream.start_info())
        if self.cfg.rollout.partial and self.stream is None:
            from .stream import TrainerStream

            self.stream = TrainerStream()
            self.stream.frontier = data_position
            start.update(self.stream.start_info())
        return self._sync(policy, version, start)

    def _sync(self, policy, version: PolicyVersion, start: Optional[dict] = None) -> Dict[str, float]:
        """`version`'s weights and statistics to the engine ranks (with `start`: where they begin)."""
        stats = version.stats.to_dict() if version.stats is not None else None
        header = {"kind": "version", "version": version.number, "stats": stats}
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
                self.receive_one(block=True)  # raises with the engines' reason
        self.failed = {"kind": "lost"}
        raise RuntimeError(f"rollout.placement=separate: the engine ranks are gone ({exc})") from exc

    # ---- mail ---------------------------------------------------------------------------------------------

    def _wait(self, key: Tuple[str, int]) -> dict:
        while key not in self.mail:
            self.receive_one(block=True)
        return self.mail.pop(key)

    def receive_one(self, block: bool) -> Optional[dict]:
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

    def _collect(self, step: int, cfg) -> Tuple[object, Dict[str, float]]:
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
                self.receive_one(block=True)
        except RuntimeError:
            pass  # the engines failed or are gone already: nothing left to stop
