"""An engine rank of rollout.placement=separate, as its own program: `serve(cfg, roles)` builds this
rank's share of the engines from the model folder trainer 0 names, then runs the schedule until it is
told to stop (`train.run` sends an engine rank here; a `Trainer` is never built on one).

Versions. Version v is the weights after v updates, shipped with the entropy statistics the trainer
computed from the batch that produced them (docs/HAPO.md "Across policy versions"): a token sampled
under v takes its temperature from those statistics. An engine applies a version whole, between two
generation steps (`bridge.receive_message` stages it complete first).

Schedules (`rollout.max_staleness` N, `rollout.partial`), both on this side, so the trainer's step is
the same whatever the schedule:
- lockstep (partial off, `EngineWorker.lockstep`): step s's batch (dynamic sampling included) is
  generated under version max(0, s − 1 − N) exactly, so results do not depend on which side is
  faster. N = 0 is the synchronous schedule on separate ranks; N = 1 is one step off policy. A
  checkpoint after step k keeps the batches k+1 … k+N already made for it (`remote.RemoteRollout`),
  so a resumed run is bit-identical.
- streaming (partial on, `rollout/stream.py`): groups stream as they finish; a new version is
  applied between decoding steps and the requests in flight continue under it. `rollout.stale`:
  wait (a prompt is admitted only while at most (N + 1) × prompts_per_step groups are ahead of the
  trainer's consumption, so no token is more than N versions behind the update that uses it) or
  drop (groups with a token more than N versions behind are dropped and counted).

The schedules use this class through its public methods only (`take`, `agreed_pending`, `handle`,
`apply_version`, `evaluate`, `send`, `add_busy`, `take_times`, and the attributes `cfg`, `inputs`,
`engine`, `collector`, `sampling`, `version`, `stats`).
"""
from __future__ import annotations

import collections
import queue
import signal
import time
import traceback
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from .. import device as dev
from ..algorithms import EntropyStats
from ..metrics import progress_bar
from ..training import stop as phases
from .bridge import Pump, receive_message, send_obj
from .collect import Layout


def serve(cfg, roles) -> None:
    """An engine rank's whole life: build, serve until stopped, release."""
    worker = EngineWorker(cfg, roles)
    try:
        worker.serve()
    finally:
        worker.close()


class EngineWorker:
    """What an engine rank runs instead of training: builds its share of the engines from the model
    folder the trainer names, then serves the schedule until trainer 0 says stop. SIGTERM is ignored
    here (the trainer's graceful stop saves first, then stops the engines); a lost trainer ends the
    worker with an error, so no engine rank outlives its job."""

    def __init__(self, cfg, roles):
        from ..training.parallel import control_group
        from .assemble import rollout_side, run_inputs

        self.cfg, self.roles = cfg, roles
        world, rank = dist.get_world_size(), dist.get_rank()  # the engine ranks' own world (checked at load)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the trainer stops us, after its checkpoint
        self.leader = roles.batches is not None
        self._pending: "collections.deque[dict]" = collections.deque()
        self.idle_s = self.busy_s = 0.0
        self.inbox = Pump("engine-inbox", receive=receive_message(roles, dev.device()))
        self.inbox.start()
        self.outbox = Pump("engine-outbox", send=lambda m: send_obj(roles.batches, m, 0), last="bye") \
            if self.leader else None
        if self.outbox is not None:
            self.outbox.start()
        try:
            hello = self.take()
            if hello["kind"] != "hello":
                raise RuntimeError(f"engine ranks: expected the trainer's hello, got {hello['kind']!r}")
            self.inputs = run_inputs(cfg, hello["model_dir"])
            self.control = control_group()
            self.layout = Layout.for_rank(cfg, world, rank)
            self.engine, self.rewards, self.collector, self.sampling = rollout_side(cfg, self.inputs, self.layout,
                                                                                    self.control)
        except BaseException as exc:
            self._fail(exc)
            raise
        self.version, self.stats = -1, None

    # ---- messages -------------------------------------------------------------------------------------

    def take(self, block: bool = True) -> Optional[dict]:
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
            msg = self.take(block)
            if block:
                self.idle_s += time.perf_counter() - t0
            if msg is None:
                return None
            self._pending.append(msg)
        return self._pending[0]

    def send(self, msg: dict) -> None:
        if self.outbox is not None:
            self.outbox.outbox.put(msg)

    def apply_version(self, msg: dict) -> None:
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
        self.send({"kind": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        self._bye()

    def _bye(self) -> None:
        """The last message to the trainer, sent before this returns."""
        self.send({"kind": "bye"})
        if self.outbox is not None:
            self.outbox.outbox.put(None)
            self.outbox.join(timeout=60)

    def serve(self) -> None:
        try:
            first = self.take()
            if first["kind"] == "stop":
                return
            if first["kind"] != "version" or "start" not in first:
                raise RuntimeError(f"engine ranks: expected the first version, got {first['kind']!r}")
            self.apply_version(first)
            start = first["start"]
            if self.cfg.rollout.partial:
                from .stream import StreamingSchedule

                StreamingSchedule(self, start).run()
            else:
                self.lockstep(start["step"], start["data_position"])
        except BaseException as exc:
            self._fail(exc)
            raise
        self._bye()

    def handle(self, msg: dict) -> bool:
        """An evaluation request or a stop (True: stop now)."""
        if msg["kind"] == "eval":
            self.evaluate(msg)
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

    def lockstep(self, step: int, position: int) -> None:
        n = self.cfg.rollout.max_staleness
        while True:
            need = step - 1 - n  # the version step s's batch is generated under (the one it holds, at start)
            while True:
                for _ in range(self.agreed_pending(block=self.version < need)):
                    head = self._pending[0]
                    if head["kind"] == "version" and head["version"] > self.version and self.version >= need:
                        break  # a newer version waits: this batch belongs to the one held
                    msg = self.take()
                    if msg["kind"] == "version":
                        self.apply_version(msg)  # the next version, or the held one again (a re-sync)
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
            self.send({"kind": "batch", "step": step, "version": self.version, "data_position": after,
                        "kept": kept, "seen": seen, "groups": groups, "gen_batches": gen_batches,
                        **self.take_times(), "time_generate": time.perf_counter() - t0})
        return after

    def add_busy(self, seconds: float) -> None:
        """Time the engine spent generating (the schedules count theirs here)."""
        self.busy_s += seconds

    def take_times(self) -> Dict[str, float]:
        out = {"engine_idle_s": self.idle_s, "engine_busy_s": self.busy_s}
        self.idle_s = self.busy_s = 0.0
        return out

    def evaluate(self, msg: dict) -> None:
        from .engine import SamplingConfig

        t0 = time.perf_counter()
        sampling = SamplingConfig.for_eval(self.cfg.eval, self.cfg.rollout.max_response_tokens, self.inputs.stop_ids)
        groups = self.collector.evaluate(self.inputs.eval_data, msg["count"], sampling, msg["n"], progress_bar(False, "", 0))
        self.busy_s += time.perf_counter() - t0
        self.send({"kind": "eval_result", "id": msg["id"], "version": self.version, "groups": groups})

    def close(self) -> None:
        if self.rewards is not None:
            self.rewards.close()
        self.engine.close()
