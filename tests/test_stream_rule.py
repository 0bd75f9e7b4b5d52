"""The streaming schedule's admission and staleness rule as a pure unit, without processes: the trainer's
side (`rollout.stream.TrainerStream`, the real code) against a simulated engine that follows the
engine side's rule (admit while admitted − consumed < (N + 1) × prompts_per_step, under the version it
holds; groups finish after a random number of decoding steps; a version lands between steps with the
consumption the trainer told). Generated schedules check every bound the docs claim:
- wait: no token is more than N versions behind the update that uses it, and nothing is dropped;
- drop: a group with a token more than N versions behind is dropped and counted, never trained on;
- the oldest admitted group is taken first; every data position is consumed once; no deadlock under
  dynamic sampling (uninformative groups filtered)."""
import collections
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_hapo.config import RolloutConfig
from megatron_hapo.rollout.collect import GroupSummary
from megatron_hapo.rollout.stream import TrainerStream


class _Popped(list):
    """The trainer's buffer, recording for each pop whether it took the oldest admitted group."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def pop(self, i=-1):
        self.log.append(self[i]["admitted"] == min(m["admitted"] for m in self))
        return super().pop(i)


class SimulatedEngine:
    """The engine side's rule, stepped only when the trainer waits for a message or trains."""

    def __init__(self, cfg, stream, rng, max_steps_per_group=6):
        self.cfg, self.stream, self.rng = cfg, stream, rng
        self.capacity = (cfg.max_staleness + 1) * cfg.prompts_per_step
        self.version = self.consumed = self.admitted = self.next_position = 0
        self.flights = []  # [position, admitted version, oldest token version, decoding steps left]
        self.outbox = collections.deque()
        self.max_steps = max_steps_per_group

    def apply(self, version, consumed):
        self.version, self.consumed = version, max(self.consumed, consumed)

    def decode(self):
        new = []
        while self.admitted - self.consumed < self.capacity:
            f = [self.next_position, self.version, None, self.rng.randint(1, self.max_steps)]
            self.flights.append(f)
            new.append((f[0], f[1]))
            self.admitted += 1
            self.next_position += 1
        if new:
            self.outbox.append({"kind": "admitted", "groups": new})
        for f in self.flights:
            if f[2] is None:
                f[2] = self.version  # the first token, under the version held now
            f[3] -= 1
        for f in [f for f in self.flights if f[3] <= 0]:
            self.flights.remove(f)
            correct = [self.rng.random() < 0.5 for _ in range(2)]
            summary = GroupSummary(f[0], [float(c) for c in correct], correct, ["ok"] * 2, [3, 3], 0, None)
            self.outbox.append({"kind": "group", "position": f[0], "admitted": f[1], "oldest": f[2],
                                "group": None, "summary": summary})

    # what RemoteRollout gives TrainerStream.take
    def receive_one(self, block=True):
        steps = 0
        while not self.outbox:
            self.decode()
            steps += 1
            assert steps < 1000, "deadlock: the engine can admit nothing and nothing is in flight"
        msg = self.outbox.popleft()
        self.stream.arrive(msg)
        return msg

    def tell(self, msg):
        self.consumed = max(self.consumed, msg["consumed"])


def run_schedule(stale, seed, staleness=2, prompts=4, steps=12, dynamic=True):
    rng = random.Random(seed)
    cfg = RolloutConfig(prompts_per_step=prompts, samples_per_prompt=2, max_staleness=staleness, partial=True,
                        stale=stale, dynamic_sampling=dynamic, max_num_gen_batches=0, placement="separate",
                        engine_ranks=1)
    stream, taken_oldest = TrainerStream(), []
    stream.buffer = _Popped(taken_oldest)
    engine = SimulatedEngine(cfg, stream, rng)
    rows, kept_versions = [], []
    for step in range(1, steps + 1):
        meta, _ = stream.take(engine, step, cfg)
        oldest_ok = step - 1 - staleness
        kept = {g.position for g in meta["kept"]}
        rows.append(meta)
        kept_versions += [(step, oldest_ok, m) for m in meta["positions_seen"] if m in kept]
        for _ in range(rng.randint(0, 8)):  # the engine decodes while the trainer trains
            engine.decode()
        stream.told = stream.consumed
        engine.apply(step, stream.consumed)  # the next version, with the consumption told
    return rows, taken_oldest, engine


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), stale=st.sampled_from(["wait", "drop"]), staleness=st.integers(1, 3))
def test_generated_schedules_keep_every_bound(seed, stale, staleness):
    rows, taken_oldest, _ = run_schedule(stale, seed, staleness)
    assert all(taken_oldest), "a group was taken while an older admitted one waited"
    used = [p for r in rows for p in r["positions_seen"]]
    assert len(used) == len(set(used)), "a data position consumed twice"
    assert set(range(rows[-1]["data_position"])) <= set(used), "a data position below the frontier lost"
    frontiers = [r["data_position"] for r in rows]
    assert frontiers == sorted(frontiers)
    for step, r in enumerate(rows, 1):
        dropped = r["stream_metrics"]["stale_dropped"]
        if stale == "wait":
            assert dropped == 0, (step, r["stream_metrics"])
        assert len(r["kept"]) == 4


def test_drop_counts_what_wait_would_have_waited_for():
    """The same engine, slow enough that groups outlive the bound: drop drops and counts them (and trains
    on none of them), wait drops none."""
    totals = {}
    for stale in ("drop", "wait"):
        rows, _, _ = run_schedule(stale, seed=3, staleness=1, steps=16)
        totals[stale] = sum(r["stream_metrics"]["stale_dropped"] for r in rows)
    assert totals["drop"] > 0 and totals["wait"] == 0, totals


@pytest.mark.parametrize("stale", ["wait", "drop"])
def test_no_kept_token_beyond_the_bound(stale):
    """Every group trained on at step s has its oldest token at version ≥ s − 1 − N."""
    rng = random.Random(11)
    cfg = RolloutConfig(prompts_per_step=4, samples_per_prompt=2, max_staleness=1, partial=True, stale=stale,
                        dynamic_sampling=True, placement="separate", engine_ranks=1)
    stream = TrainerStream()
    engine = SimulatedEngine(cfg, stream, rng, max_steps_per_group=10)
    oldest_of = {}
    arrive = stream.arrive

    def note(msg):
        if msg["kind"] == "group":
            oldest_of[msg["position"]] = msg["oldest"]
        arrive(msg)

    stream.arrive = note
    for step in range(1, 15):
        meta, _ = stream.take(engine, step, cfg)
        assert all(oldest_of[g.position] >= step - 1 - cfg.max_staleness for g in meta["kept"]), step
        for _ in range(rng.randint(0, 10)):
            engine.decode()
        stream.told = stream.consumed
        engine.apply(step, stream.consumed)
