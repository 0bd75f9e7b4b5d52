"""Rollout collection: every engine generates its slice of a step's prompts, its first rank scores
them, dynamic sampling keeps the informative groups, and one exchange hands each data-parallel
rank its share as one typed `RolloutBatch`.

What crosses ranks: a few numbers per response (`GroupSummary`: rewards, correctness, lengths,
temperature range) are gathered so every rank sees the same list, which makes dynamic sampling,
metrics and the split over data-parallel ranks identical under every layout; then one all-to-all
of pickled bytes moves each kept group's tokens from the rank that generated it to the rank that
trains on it. A prompt's samples depend only on (seed, its position in the data stream).
Everything here runs on the gloo control group (host bytes, the long control timeout).
"""
from __future__ import annotations

import dataclasses
import pickle
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .. import algorithms as A
from ..data.datasets import split_evenly
from ..rewards import RewardResult, RewardWorkersError
from ..training import stop

PER_TOKEN = ("temperatures", "entropies", "logprobs", "logprobs_t1")  # what the engine recorded per token


class Sample:
    """One response, compact for the exchange (float32 arrays, not Python lists)."""

    __slots__ = ("token_ids", "truncated", "error", "routing", "model_mask", "tools", "versions") + PER_TOKEN

    def __init__(self, response):
        self.token_ids = list(response.token_ids)
        for name in PER_TOKEN:
            setattr(self, name, np.asarray(getattr(response, name), dtype=np.float32))
        self.routing = getattr(response, "routing", None)  # routing replay: int16 [layers, positions fed, k]
        self.truncated = response.finish_reason == "length"
        self.error = response.error
        # multi-turn: per token, True for the model's own (None: all are, single-turn); tool counts
        mask = getattr(response, "model_mask", None)
        self.model_mask = None if mask is None or all(mask) else np.asarray(mask, dtype=bool)
        self.tools = getattr(response, "tools", None)
        versions = getattr(response, "versions", None)  # the weight version each token was sampled under
        self.versions = None if versions is None else np.asarray(versions, dtype=np.int32)

    @property
    def length(self) -> int:
        """Model tokens: what the response caps, overlong shaping and the length metrics count."""
        return len(self.token_ids) if self.model_mask is None else int(self.model_mask.sum())

    def model_values(self, name: str) -> np.ndarray:
        """A per-token record at the model's tokens only."""
        v = getattr(self, name)
        return v if self.model_mask is None else v[self.model_mask]


@dataclasses.dataclass
class GroupSummary:
    """What every rank learns about every group (a few numbers per response); the tokens stay
    with the rank that generated them until the exchange."""

    position: int
    rewards: object  # list of floats; a float32 tensor once shaped (overlong penalty)
    correct: List[bool]
    statuses: List[str]  # the verifier's status per response; "rollout_error" when generation failed
    lengths: List[int]
    truncated: int
    temps: Optional[Tuple[float, float, float, int]]  # min, max, sum, count of the sampled temperatures
    first_error: Optional[str] = None  # the first verifier error's reason in this group
    # multi-turn: per response (calls, errors, timeouts, turns); (turns,) with an environment and no tools
    tools: Optional[List[Tuple[int, ...]]] = None


@dataclasses.dataclass
class Group:
    """A prompt and its scored samples, on the rank that generated it."""

    position: int
    prompt_ids: List[int]
    samples: List[Sample]
    rewards: List[float]
    correct: List[bool]
    statuses: List[str]
    first_error: Optional[str] = None

    def summary(self) -> GroupSummary:
        temps = np.concatenate([s.model_values("temperatures") for s in self.samples] or [np.zeros(0, np.float32)])
        tools = [s.tools for s in self.samples if s.tools is not None]
        return GroupSummary(self.position, list(self.rewards), list(self.correct), list(self.statuses),
                            [s.length for s in self.samples], sum(s.truncated for s in self.samples),
                            (float(temps.min()), float(temps.max()), float(temps.sum()), int(temps.size)) if temps.size else None,
                            self.first_error, tools or None)


def describe_groups(groups: Sequence[GroupSummary]) -> str:
    """What a list of groups looked like: how many were all correct, all wrong, all errored, mixed."""
    kinds = {"all correct": 0, "all wrong": 0, "all reward errors": 0, "all timed out": 0, "mixed": 0}
    for g in groups:
        if all(st == "error" for st in g.statuses):
            kinds["all reward errors"] += 1
        elif all(st == "timeout" for st in g.statuses):
            kinds["all timed out"] += 1
        elif all(g.correct):
            kinds["all correct"] += 1
        elif not any(g.correct):
            kinds["all wrong"] += 1
        else:
            kinds["mixed"] += 1
    return ", ".join(f"{n} {k}" for k, n in kinds.items() if n) or "none"


def accept_group(g: GroupSummary, cfg) -> bool:
    """Shapes a group's rewards in place (DAPO's overlong penalty) and says whether dynamic sampling
    keeps it: on correctness (DAPO's metric=acc), not on the shaped reward: an all-wrong group whose
    lengths differ has unequal shaped rewards but nothing to learn (HAPO.md, dynamic sampling)."""
    rewards = torch.tensor(g.rewards, dtype=torch.float32)
    if cfg.overlong_buffer:
        rewards = rewards + A.overlong_penalty(g.lengths, cfg.max_response_tokens, cfg.overlong_buffer,
                                               cfg.overlong_penalty_factor)
    g.rewards = rewards
    correct = torch.tensor(g.correct, dtype=torch.float32)
    return not cfg.dynamic_sampling or bool(A.informative_groups(correct, [0] * len(correct)).all())


class DynamicSamplingFill:
    """The one dynamic-sampling rule, for both placements' schedules: groups are offered in the order
    they are used; one is kept while fewer than rollout.prompts_per_step are (under dynamic sampling,
    only an informative one: `accept_group`); the budget is rollout.max_num_gen_batches ×
    prompts_per_step groups seen (0: none), and spending it without filling the step is the one error."""

    def __init__(self, cfg):
        self.cfg, self.need = cfg, cfg.prompts_per_step
        self.kept: List[GroupSummary] = []
        self.seen: List[GroupSummary] = []

    @property
    def full(self) -> bool:
        return len(self.kept) >= self.need

    @property
    def gen_batches(self) -> int:
        """Generation batches of prompts_per_step prompts the groups seen make up."""
        return -(-len(self.seen) // self.need)

    def offer(self, g: GroupSummary) -> bool:
        """Whether `g` is kept; raises once the budget is spent and the step is not full."""
        self.seen.append(g)
        keep = not self.full and accept_group(g, self.cfg)
        if keep:
            self.kept.append(g)
        self.check_budget()
        return keep

    def check_budget(self) -> None:
        budget = self.cfg.max_num_gen_batches
        if budget and not self.full and len(self.seen) >= budget * self.need:
            raise RuntimeError(f"dynamic sampling: only {len(self.kept)} of {self.need} informative groups after "
                               f"{len(self.seen)} groups ({budget} generation batches, rollout.max_num_gen_batches); "
                               f"the groups seen: {describe_groups(self.seen)}")


@dataclasses.dataclass
class RolloutBatch:
    """A step's rollouts: this data-parallel rank's sequences (one row per response, grouped by
    prompt) and, for metrics, the summaries of every group kept and seen on all ranks."""

    prompt_ids: List[List[int]]
    response_ids: List[List[int]]
    rewards: torch.Tensor  # [N] after shaping
    group_ids: List[int]  # [N] the row's group among this rank's groups
    per_token: Dict[str, List[np.ndarray]]  # PER_TOKEN name -> one float32 array per response
    kept: List[GroupSummary]  # global, the same on every rank
    seen: List[GroupSummary]
    gen_batches: int
    routing: Optional[List[object]] = None  # routing replay: per response, int16 [layers, prompt + response − 1, k]
    model_masks: Optional[List[Optional[np.ndarray]]] = None  # multi-turn: per response, True at the model's tokens
    versions: Optional[List[Optional[np.ndarray]]] = None  # separate placement: per response, each token's weight version

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def prompt_lens(self) -> List[int]:
        return [len(p) for p in self.prompt_ids]

    @property
    def response_lens(self) -> List[int]:
        return [len(r) for r in self.response_ids]

    @property
    def lengths(self) -> torch.Tensor:
        """Model tokens per response (tool tokens are context, not the response's length)."""
        masks = self.model_masks or [None] * len(self)
        return torch.tensor([n if m is None else int(m.sum()) for n, m in zip(self.response_lens, masks)])

    def padded(self, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, loss_mask), right-padded to the longest row plus one spare column so the
        last position scores nothing; built on the host, moved in one copy each. A tool's tokens
        (multi-turn) are not scored."""
        return pad_rows([p + r for p, r in zip(self.prompt_ids, self.response_ids)], self.prompt_lens,
                        self.response_lens, device, self.model_masks)

    def model_values(self, name: str) -> List[np.ndarray]:
        """A per-token record (PER_TOKEN) per response, at the model's tokens only."""
        masks = self.model_masks or [None] * len(self)
        return [v if m is None else v[m] for v, m in zip(self.per_token[name], masks)]

    def per_position(self, name: str, width: int, device=None) -> torch.Tensor:
        """A per-token record (PER_TOKEN, or "versions" where the batch has them) aligned with the loss
        mask: [N, width], zero elsewhere (versions: −1)."""
        values = self.versions if name == "versions" else self.per_token[name]
        out = torch.zeros(len(self), width) if name != "versions" else torch.full((len(self), width), -1.0)
        for i, (v, p) in enumerate(zip(values, self.prompt_lens)):
            if len(v):
                out[i, p - 1: p - 1 + len(v)] = torch.from_numpy(v)
        return out.to(device or "cpu")


    def per_position_routing(self, width: int, device=None) -> Optional[torch.Tensor]:
        """Routing replay: the rollout's experts per position [N, width, layers, k] (int16), −1 where
        nothing was recorded (each row's last token, padding); None without records."""
        first = next((r for r in self.routing or () if r is not None), None)
        if first is None:
            return None
        layers, _, k = first.shape
        out = torch.full((len(self), width, layers, k), -1, dtype=torch.int16)
        for i, r in enumerate(self.routing):
            if r is not None:  # a failed generation has no records: its row keeps −1 (experts 0..k−1; no loss there)
                out[i, :r.shape[1]] = torch.from_numpy(np.ascontiguousarray(r.transpose(1, 0, 2)))
        return out.to(device or "cpu")


def pad_rows(rows: List[List[int]], prompt_lens: List[int], resp_lens: List[int], device=None, model_masks=None):
    """(input_ids, loss_mask) for prompt+response rows: position t scores token t+1. model_masks:
    per row None (every response token scored) or a bool array over its response tokens (multi-turn:
    False at a tool's tokens, never scored)."""
    width = max(len(r) for r in rows) + 1
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (r, p, n) in enumerate(zip(rows, prompt_lens, resp_lens)):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        m = None if model_masks is None else model_masks[i]
        mask[i, p - 1: p - 1 + n] = True if m is None else torch.as_tensor(np.asarray(m, dtype=bool))
    return ids.to(device or "cpu"), mask.to(device or "cpu")


SEED_MODULUS = 2**31 - 1


def prompt_seed(seed: int, position: int) -> int:
    """The one seed rule: a prompt's samples are seeded by (the run's seed, its data position), so they
    do not depend on the engine, the batch or the placement that generates them."""
    return (seed * 1_000_003 + position) % SEED_MODULUS


@dataclasses.dataclass
class Layout:
    """Where this rank sits: its engine (and whether it scores for it) and its data-parallel share."""

    world: int
    rank: int
    num_engines: int
    engine_index: int
    engine_leader: bool
    dp: int
    dp_rank: int

    @classmethod
    def for_rank(cls, cfg, world: int, rank: int, dp: int = 1, dp_rank: int = 0, hosts_engine: bool = True) -> "Layout":
        """The one place a layout is built. hosts_engine: this rank holds a share of an engine (colocated
        ranks, and the engine ranks of separate placement, whose world is their own); else a trainer rank
        of separate placement, which places only its data-parallel share of the engines' rollouts."""
        itp = cfg.parallel.inference_tensor_parallel_size
        if hosts_engine:
            return cls(world, rank, world // itp, rank // itp, rank % itp == 0, dp, dp_rank)
        return cls(world, rank, max(cfg.rollout.engine_ranks // itp, 1), 0, False, dp, dp_rank)


class RolloutCollector:
    """Generation, scoring and the exchange for one rank. `engine` needs only
    `generate(prompts, n, sampling, stats, seeds=)` returning per prompt a list of responses
    (`rollout.engine.Response`); `rewards` (a `RewardPool`, on engine leaders only) scores texts."""

    def __init__(self, engine, rewards, failure_reward: float, decode: Callable[[List[List[int]]], List[str]],
                 layout: Layout, control, seed: int, max_error_fraction: float = 1.0, reward_name: str = "auto"):
        self.engine, self.rewards, self.failure_reward, self.decode = engine, rewards, failure_reward, decode
        self.layout, self.control, self.seed = layout, control, seed
        self.max_error_fraction, self.reward_name = max_error_fraction, reward_name
        self.rank_dp = [None] * layout.world  # who trains on which data-parallel share
        dist.all_gather_object(self.rank_dp, layout.dp_rank, group=control)

    # ---- one generation batch on every engine -----------------------------------------------------

    def evaluate(self, dataset, count: int, sampling, n: int, bar) -> List[GroupSummary]:
        """The first `count` prompts of an evaluation set, n responses each, in chunks of 256 prompts
        per engine (every prompt evaluated; engines take slices that differ by at most one)."""
        chunk, groups = 256 * self.layout.num_engines, []
        for start in range(0, count, chunk):
            positions = list(range(start, min(start + chunk, count)))
            groups += self.generate(positions, positions, dataset, sampling, n, None)[0]
            bar.update(1)
        return groups

    def generate(self, positions: List[int], indices: List[int], dataset, sampling, n: int, stats,
                 ) -> Tuple[List[GroupSummary], Dict[int, Group]]:
        """Every engine generates its slice of the prompts and its first rank scores it. Returns the
        summaries of all engines' groups (the same list on every rank, by position) and this rank's
        own full groups {position: Group}."""
        lay = self.layout
        mine = split_evenly(list(zip(positions, indices)), lay.num_engines, lay.engine_index)
        prompts = [dataset[i].prompt_ids for _, i in mine]
        seeds = [prompt_seed(self.seed, pos) for pos, _ in mine]
        rows = {"rows": [dataset[i].row for _, i in mine]} if getattr(self.engine, "needs_rows", False) else {}
        outs = self.engine.generate(prompts, n, sampling, stats, seeds=seeds, **rows)
        local = self.score([(pos, dataset[i].prompt_ids) for pos, i in mine], outs, [dataset[i].ground_truth for _, i in mine])
        gathered = [None] * lay.world
        dist.all_gather_object(gathered, [g.summary() for g in local], group=self.control)
        summaries = sorted((g for part in gathered for g in part), key=lambda g: g.position)
        self.check_reward_errors(summaries)
        return summaries, {g.position: g for g in local}

    def score(self, groups_prompts, outs, truths) -> List[Group]:
        """Rewards for this engine's responses (its first rank scores; the others return nothing)."""
        if not self.layout.engine_leader:
            return []
        flat = [x for responses in outs for x in responses]
        stop.mark("scoring")
        if self.reward_name == "environment":  # each episode's own reward (rollout/env_api.py)
            results = [x.env or RewardResult(self.failure_reward, "no environment result", status="error") for x in flat]
        else:
            texts = self.decode([x.token_ids[getattr(x, 'answer_start', 0):] for x in flat])  # multi-turn: the last turn
            try:
                results = self.rewards.score(texts, [g for g, responses in zip(truths, outs) for _ in responses])
            except RewardWorkersError as exc:  # a re-spawn failed: every response errors, and the check stops the run
                results = [RewardResult(self.failure_reward, str(exc), status="error")] * len(flat)
        out, k = [], 0
        for (position, prompt), responses in zip(groups_prompts, outs):
            res = results[k: k + len(responses)]
            k += len(responses)
            statuses = ["rollout_error" if x.error else s.status for x, s in zip(responses, res)]
            first_error = next((s.reason for x, s in zip(responses, res) if not x.error and s.status == "error"), None)
            out.append(Group(position, list(prompt), [Sample(x) for x in responses], [s.score for s in res],
                             [bool(s.correct) for s in res], statuses, first_error))
        return out

    def check_reward_errors(self, groups: List[GroupSummary]) -> None:
        """Stops (on every rank: the summaries are the same everywhere) when the verifier errored on
        at least reward.max_error_fraction of a batch's scored responses (default 1.0: on all of
        them), quoting its first error: training or evaluating on failure rewards is never wanted."""
        statuses = [st for g in groups for st in g.statuses if st != "rollout_error"]
        errors = statuses.count("error")
        limit = self.max_error_fraction
        if not errors or errors < limit * len(statuses):
            return
        first = next((g.first_error for g in groups if g.first_error), "(no reason recorded)")
        if self.reward_name == "environment":
            what, check = "environment", ("Check the environment's reset(row) and step(turn) by hand "
                                          "(megatron_hapo.rollout.env_api.make(...))")
        else:
            what, check = "verifier", (f"Check reward.type={self.reward_name!r} on one response by hand "
                                       f"(megatron_hapo.rewards.build_verifier(...).score(text, answer))")
        raise RuntimeError(f"reward: the {what} failed on {errors} of {len(statuses)} responses of a batch "
                           f"(reward.max_error_fraction={limit:g}); the first error:\n    {first}\n{check}.")

    # ---- a training step's rollouts ---------------------------------------------------------------

    def collect(self, data_position: int, sampler, dataset, sampling, cfg, stats, bar) -> Tuple[RolloutBatch, int]:
        """`cfg.prompts_per_step` groups (only informative ones under dynamic sampling) from the data
        stream at `data_position`, this rank's share as a RolloutBatch; and the new data position.
        `cfg` is the rollout section (prompts_per_step, samples_per_prompt, dynamic sampling,
        overlong shaping, max_num_gen_batches)."""
        kept, seen, local, gen_batches, data_position = self.gather_groups(data_position, sampler, dataset, sampling,
                                                                           cfg, stats, bar)
        return self.build_batch(kept, seen, local, gen_batches), data_position

    def gather_groups(self, data_position: int, sampler, dataset, sampling, cfg, stats, bar):
        """The generation side of `collect`: (kept, seen, this rank's full groups, generation batches,
        the new data position); the kept and seen summaries are the same on every rank."""
        need, fill = cfg.prompts_per_step, DynamicSamplingFill(cfg)
        local: Dict[int, Group] = {}
        while not fill.full:
            positions = list(range(data_position, data_position + need))
            data_position += need
            groups, mine = self.generate(positions, sampler.indices(positions[0], need), dataset, sampling,
                                         cfg.samples_per_prompt, stats)
            local.update(mine)
            for g in groups:
                fill.offer(g)
            bar.update(len(fill.kept) - bar.n)
            bar.set_postfix_str(f"generation batch {fill.gen_batches}")
        kept, seen, gen_batches = fill.kept, fill.seen, fill.gen_batches
        return kept, seen, local, gen_batches, data_position

    def build_batch(self, kept: List[GroupSummary], seen: List[GroupSummary], local: Dict[int, Group],
                    gen_batches: int) -> RolloutBatch:
        """The exchange side of `collect`: this data-parallel rank's share of the kept groups (their
        full groups are in some rank's `local`) as a RolloutBatch."""
        lay = self.layout
        wanted = [[g.position for g in split_evenly(kept, lay.dp, d)] for d in range(lay.dp)]
        groups = self.exchange(wanted, local)
        summaries = split_evenly(kept, lay.dp, lay.dp_rank)  # same order as `groups`: shaped rewards
        rows = [(gi, g, s, r) for gi, (g, summ) in enumerate(zip(groups, summaries))
                for s, r in zip(g.samples, summ.rewards.tolist())]
        samples = [s for _, _, s, _ in rows]
        return RolloutBatch(prompt_ids=[g.prompt_ids for _, g, _, _ in rows], response_ids=[s.token_ids for s in samples],
                            rewards=torch.tensor([r for *_, r in rows], dtype=torch.float32),
                            group_ids=[gi for gi, *_ in rows],
                            per_token={name: [getattr(s, name) for s in samples] for name in PER_TOKEN},
                            kept=kept, seen=seen, gen_batches=gen_batches,
                            routing=[s.routing for s in samples] if any(s.routing is not None for s in samples) else None,
                            model_masks=[s.model_mask for s in samples]
                            if any(s.model_mask is not None for s in samples) else None,
                            versions=[s.versions for s in samples] if any(s.versions is not None for s in samples)
                            else None)

    def exchange(self, wanted_by_dp_rank: List[List[int]], local: Dict[int, Group]) -> List[Group]:
        """Moves full groups from the ranks that generated them to the data-parallel ranks that
        train on them (one all-to-all of pickled bytes; nothing else crosses ranks). Returns this
        rank's groups in the order of its list."""
        send = []
        for r in range(self.layout.world):
            want = wanted_by_dp_rank[self.rank_dp[r]]
            send.append(pickle.dumps([local[p] for p in want if p in local], protocol=pickle.HIGHEST_PROTOCOL))
        sizes = torch.tensor([len(b) for b in send], dtype=torch.long)
        recv_sizes = torch.empty_like(sizes)
        dist.all_to_all_single(recv_sizes, sizes, group=self.control)
        out = torch.empty(int(recv_sizes.sum()), dtype=torch.uint8)
        payload = torch.frombuffer(bytearray(b"".join(send)), dtype=torch.uint8) if sum(map(len, send)) else \
            torch.empty(0, dtype=torch.uint8)
        dist.all_to_all_single(out, payload, output_split_sizes=recv_sizes.tolist(), input_split_sizes=sizes.tolist(),
                               group=self.control)
        received: Dict[int, Group] = {}
        for chunk in out.split(recv_sizes.tolist()):
            for g in pickle.loads(chunk.numpy().tobytes()):
                received[g.position] = g
        mine = wanted_by_dp_rank[self.layout.dp_rank]
        missing = [p for p in mine if p not in received]
        if missing:
            raise RuntimeError(f"rollout exchange: groups at positions {missing[:5]} did not arrive")
        return [received[p] for p in mine]
