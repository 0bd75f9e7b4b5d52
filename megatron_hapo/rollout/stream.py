"""Partial rollouts (rollout.partial, separate placement): groups stream to the trainer as they
finish, and a new version lands between two decoding steps without waiting for the rollouts in flight.

Engine side (`StreamingSchedule`): vLLM is driven step by step (`LLMEngine.step`). Prompts are
admitted in data order while fewer than (max_staleness + 1) × prompts_per_step groups are ahead of
what the trainer has consumed (the bounded buffer). Between two steps the engine reads the
trainer's messages: a version pauses every request in flight (aborted, its tokens and per-token
records kept), loads the weights whole, and continues each request under them: the prompt plus
the tokens so far re-enter as a new request (the KV cache recomputed under the new weights), with
the new version's entropy statistics for its temperature and a seed of its own. Every token
records the version it was sampled under; its temperature, entropy and log-probs are those of
that version's distribution, so behaviour log-probs stay exact across the switch. An evaluation
request pauses the same way. A finished group is scored and sent with the version it was admitted
under and its tokens' versions.

Trainer side (`TrainerStream`): of the groups received, the one admitted under the oldest version
is taken first (then arrival order). A group whose oldest token is more than max_staleness versions
behind the update's start (step − 1) is too stale: with rollout.stale=drop it is dropped and
counted; with wait the trainer first waits for every group in flight admitted at the last version
still allowed, and the engine is told of consumption beyond a version's only when the trainer
starves (so what it then admits is used at once), which keeps every group within the bound.
Data position: every admitted prompt is consumed once (trained, filtered by dynamic sampling, or
dropped); a checkpoint keeps the groups received and not yet used, which positions are done and
the frontier below which all are, so a resumed run regenerates only what was in flight.
"""
from __future__ import annotations

import itertools
import os
import time
from typing import Dict, List

import numpy as np

from ..training import stop as phases
from .collect import SEED_MODULUS, DynamicSamplingFill, prompt_seed


class _Seq:
    """One response in flight: its tokens and per-token records so far, over its parts."""

    __slots__ = ("flight", "j", "seed", "tokens", "raw", "temps", "ents", "lp", "lp1", "versions", "finish", "req",
                 "tag", "part_tokens", "part_raw", "parts")

    def __init__(self, flight, j: int, seed: int):
        self.flight, self.j, self.seed = flight, j, seed
        self.tokens, self.raw, self.temps, self.ents, self.lp, self.lp1, self.versions = [], [], [], [], [], [], []
        self.finish, self.req, self.tag, self.part_tokens, self.part_raw, self.parts = None, None, None, [], [], 0


class _Flight:
    """One prompt's group in flight."""

    def __init__(self, position: int, prompt: List[int], truth, version: int):
        self.position, self.prompt, self.truth, self.version = position, prompt, truth, version
        self.seqs: List[_Seq] = []


class StreamingSchedule:
    def __init__(self, worker, start: dict):
        self.w = worker
        self.cfg = worker.cfg.rollout
        self.engine = worker.engine
        self.le = worker.engine.llm.llm_engine
        self.frontier = int(start["frontier"])
        self.done = set(start["done"])  # positions ≥ frontier already consumed or held by the trainer
        self.admitted, self.consumed = int(start["admitted"]), int(start["consumed"])
        self.next_position = self.frontier
        self.flights: Dict[int, _Flight] = {}
        self.running: Dict[str, _Seq] = {}  # vLLM request id → the part it generates
        self.counter = itertools.count()
        self.capacity = (self.cfg.max_staleness + 1) * self.cfg.prompts_per_step
        # tests: a slower engine (seconds a decoding step), so that versions land mid-response
        self.test_step_sleep = float(os.environ.get("MEGATRON_HAPO_TEST_STEP_SLEEP", "0"))

    # ---- the loop ---------------------------------------------------------------------------------------

    def run(self) -> None:
        w = self.w
        while True:
            msgs = self._agreed_messages(block=not self.running and self.admitted - self.consumed >= self.capacity)
            for msg in msgs:
                if msg["kind"] == "version":
                    self._pause()
                    w.apply_version(msg)
                    self.consumed = max(self.consumed, int(msg.get("consumed", 0)))
                    self._resume()
                elif msg["kind"] == "consumed":  # the trainer waits for groups: the buffer has room again
                    self.consumed = max(self.consumed, int(msg["consumed"]))
                elif msg["kind"] == "eval":
                    self._pause()
                    w.evaluate(msg)
                    self._resume()
                elif w.handle(msg):
                    self._pause()
                    return
            self._admit()
            if not self.running:
                continue
            t0 = time.perf_counter()
            phases.set_step(w.version + 1)  # the step the engine's current weights serve first
            phases.mark("rollout")
            finished = []
            if self.test_step_sleep:
                time.sleep(self.test_step_sleep)
            for out in self.le.step():
                seq = self.running.get(out.request_id)
                if seq is None:
                    continue
                comp = out.outputs[0]
                seq.part_tokens += list(comp.token_ids)
                seq.part_raw += [comp.logprobs[k][tok].logprob for k, tok in enumerate(comp.token_ids)]
                if out.finished:
                    seq.finish = comp.finish_reason
                    finished.append(seq)
            self._close_parts(finished)
            w.add_busy(time.perf_counter() - t0)
            self._send_done()

    def _agreed_messages(self, block: bool) -> List[dict]:
        """The trainer's messages to act on now, the same on every rank of the engine (its TP ranks
        step vLLM together): `engine_rank.EngineWorker.agreed_pending`."""
        return [self.w.take() for _ in range(self.w.agreed_pending(block))]

    # ---- admission ---------------------------------------------------------------------------------------

    def _admit(self) -> None:
        w, data = self.w, self.w.inputs
        new = []
        while self.admitted - self.consumed < self.capacity:
            while self.next_position in self.done:
                self.next_position += 1
            pos = self.next_position
            self.next_position += 1
            item = data.train_data[data.sampler.indices(pos, 1)[0]]
            flight = _Flight(pos, list(item.prompt_ids), item.ground_truth, w.version)
            base = prompt_seed(w.cfg.train.seed, pos)
            flight.seqs = [_Seq(flight, j, base + j) for j in range(self.cfg.samples_per_prompt)]
            self.flights[pos] = flight
            for seq in flight.seqs:
                self._submit(seq)
            self.admitted += 1
            new.append((pos, w.version))
        if new:
            w.send({"kind": "admitted", "groups": new})

    def _submit(self, seq: _Seq) -> None:
        """The next part of a response: the prompt and its tokens so far, under the version held."""
        w, flight = self.w, seq.flight
        from vllm import TokensPrompt

        context = flight.prompt + seq.tokens
        budget = min(self.cfg.max_response_tokens - len(seq.tokens), self.engine.max_model_len - len(context))
        if budget < 1:
            seq.finish = "length"
            return
        seq.tag = f"p{next(self.counter)}"
        seed = seq.seed if seq.parts == 0 else (seq.seed * 1_000_003 + 7919 * seq.parts) % SEED_MODULUS
        stats = w.stats if w.cfg.algorithm.adaptive_temperature else None
        params = self.engine.request_params(w.sampling, stats, seq.tag, seed, budget, delta=True)
        self.le.add_request(seq.tag, TokensPrompt(prompt_token_ids=context), params)
        seq.req = seq.tag  # outputs and aborts name requests by the id given (vLLM keeps an internal one apart)
        seq.part_tokens, seq.part_raw = [], []
        seq.parts += 1
        self.running[seq.req] = seq

    # ---- pausing ----------------------------------------------------------------------------------------

    def _pause(self) -> None:
        """Every request in flight stopped, its tokens so far kept with their records."""
        if not self.running:
            return
        seqs = list(self.running.values())
        self.le.abort_request([s.req for s in seqs])
        self._close_parts(seqs)

    def _resume(self) -> None:
        for flight in self.flights.values():
            for seq in flight.seqs:
                if seq.finish is None and seq.req is None:
                    self._submit(seq)

    def _close_parts(self, seqs: List[_Seq]) -> None:
        """The parts of `seqs` end (finished or paused): their records, at the version they ran under."""
        from .engine import token_records
        from .temperature_processor import RECORDER

        if not seqs:
            return
        records = RECORDER.pop({s.tag for s in seqs})
        for seq in seqs:
            self.running.pop(seq.req, None)
            temps, ents, lp, lp1 = token_records(seq.part_raw, records[seq.tag])
            seq.tokens += seq.part_tokens
            seq.raw += seq.part_raw
            seq.temps += temps
            seq.ents += ents
            seq.lp += lp
            seq.lp1 += lp1
            seq.versions += [self.w.version] * len(seq.part_tokens)
            seq.req = None
            if seq.finish is None and len(seq.tokens) >= self.cfg.max_response_tokens:
                seq.finish = "length"

    # ---- finished groups ---------------------------------------------------------------------------------

    def _send_done(self) -> None:
        from .engine import Response

        w = self.w
        done = [f for f in self.flights.values() if all(s.finish is not None and s.req is None for s in f.seqs)]
        if not done:
            return
        outs = [[Response(0, s.j, s.tokens, s.temps, s.ents, s.lp, s.lp1, s.finish, versions=s.versions) for s in f.seqs]
                for f in done]
        groups = w.collector.score([(f.position, f.prompt) for f in done], outs, [f.truth for f in done])
        for f in done:
            del self.flights[f.position]
        for f, g in zip(done, groups):  # the engine's first rank (the others score nothing)
            versions = np.concatenate([s.versions for s in g.samples if s.versions is not None and len(s.versions)]
                                      or [np.array([f.version], dtype=np.int32)])
            w.send({"kind": "group", "position": f.position, "admitted": f.version, "oldest": int(versions.min()),
                     "group": g, "summary": g.summary(), **w.take_times()})


class TrainerStream:
    """Trainer 0's view of the stream: groups received and not used (arrival order), groups in
    flight (admitted, not received) with the version they were admitted under, what is consumed."""

    def __init__(self):
        self.buffer: List[dict] = []
        self.in_flight: Dict[int, int] = {}
        self.consumed = 0
        self.told = 0  # the consumption the engine was last told of
        self.done: set = set()  # positions consumed above the frontier
        self.frontier = 0
        self.busy = self.idle = 0.0

    def start_info(self) -> dict:
        held = {m["position"] for m in self.buffer}
        return {"frontier": self.frontier, "done": sorted(self.done | held), "admitted": self.consumed + len(self.buffer),
                "consumed": self.consumed}

    def snapshot(self) -> "TrainerStream":
        out = TrainerStream()
        out.buffer, out.consumed, out.done, out.frontier = list(self.buffer), self.consumed, set(self.done), self.frontier
        out.told = self.consumed
        return out  # in flight: regenerated after a resume

    def arrive(self, msg: dict) -> None:
        if msg["kind"] == "admitted":
            self.in_flight.update(dict(msg["groups"]))
            return
        self.in_flight.pop(msg["position"], None)
        self.busy += msg.get("engine_busy_s", 0.0)
        self.idle += msg.get("engine_idle_s", 0.0)
        self.buffer.append(msg)

    def take(self, remote, step: int, cfg):
        """Step `step`'s groups: (metadata as the lockstep batch message has it, {position: Group})."""
        oldest_ok = step - 1 - cfg.max_staleness  # the oldest version a token of this step's groups may have
        fill = DynamicSamplingFill(cfg)
        groups, positions, dropped = {}, [], 0
        waited = 0  # groups in their last allowed step that were still in flight: the trainer waited for them
        while not fill.full:
            if cfg.stale == "wait":  # groups in their last allowed step go first: wait until they are here
                due = sum(v <= oldest_ok for v in self.in_flight.values())
                waited = max(waited, due)
                while any(v <= oldest_ok for v in self.in_flight.values()):
                    remote.receive_one(block=True)
            while not self.buffer:
                # the engine admits against the consumption it was told of; more is told when the trainer
                # starves (drop: the buffer is empty; wait: nothing is in flight either). Under wait only
                # as much as this step still lacks, so that what the engine admits now, under the version
                # of the step before, is used now: a full buffer's worth admitted under it would outlive
                # the bound (tests/test_stream_rule.py found that schedule)
                starved = cfg.stale == "drop" or not self.in_flight
                if starved and self.consumed > self.told:
                    lacking = cfg.prompts_per_step - len(fill.kept)
                    self.told = self.consumed if cfg.stale == "drop" else min(self.consumed, self.told + lacking)
                    remote.tell({"kind": "consumed", "consumed": self.told})
                remote.receive_one(block=True)
            # the oldest admitted first (then arrival order): what would go stale soonest is used soonest
            msg = self.buffer.pop(min(range(len(self.buffer)), key=lambda i: (self.buffer[i]["admitted"], i)))
            self.consumed += 1
            self.done.add(msg["position"])
            positions.append(msg["position"])
            if msg["oldest"] < oldest_ok:
                dropped += 1
                continue
            g = msg["summary"]
            if fill.offer(g):
                groups[g.position] = msg["group"]
        while self.frontier in self.done:
            self.done.discard(self.frontier)
            self.frontier += 1
        meta = {"kept": fill.kept, "seen": fill.seen, "gen_batches": fill.gen_batches, "data_position": self.frontier,
                "time_generate": self.busy, "engine_busy_s": self.busy, "engine_idle_s": self.idle,
                "positions_seen": sorted(positions),
                "stream_metrics": {"stale_dropped": float(dropped), "stale_waited": float(waited),
                                   "stream_buffered": float(len(self.buffer)),
                                   "stream_in_flight": float(len(self.in_flight))}}
        self.busy = self.idle = 0.0
        return meta, groups
