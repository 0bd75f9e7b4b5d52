"""Rollout collection on real gloo ranks: generation slices, scoring, dynamic sampling, overlong
shaping and the all-to-all that gives each data-parallel rank its groups. Only the generator is a
stand-in (a deterministic function of the prompt and its seed, like vLLM's seeded sampling); the
reward pool, the process groups and the tensors are the real ones."""
import dataclasses

import pytest

from .distributed import run_ranks

N_PROMPTS, N_SAMPLES = 32, 4


@dataclasses.dataclass
class FakeResponse:
    token_ids: list
    temperatures: list
    entropies: list
    logprobs: list
    logprobs_t1: list
    finish_reason: str
    error: str = None


class StandInEngine:
    """Echoes the prompt (the correct answer) for some samples of even seeds; odd seeds never
    answer correctly, so their groups are all wrong and dynamic sampling drops them."""

    calls = 0

    def generate(self, prompts, n, sampling, stats, seeds):
        StandInEngine.calls += 1
        out = []
        for prompt, s in zip(prompts, seeds):
            responses = []
            for j in range(n):
                if sampling["echo"] and s % 2 == 0 and (s + j) % 3 == 0:
                    ids = list(prompt)
                else:
                    ids = [(s + 7 * j + k) % 50 + 3 for k in range(1 + (s + j) % sampling["max_tokens"])]
                L = len(ids)
                responses.append(FakeResponse(ids, [1.0 + 0.01 * k for k in range(L)], [0.5 + 0.1 * k for k in range(L)],
                                              [-0.1 * (k + 1) - 0.01 * (s % 5) for k in range(L)],
                                              [-0.1 * (k + 1) - 0.01 * (s % 5) - 0.001 for k in range(L)],
                                              "length" if L == sampling["max_tokens"] else "stop"))
            out.append(responses)
        return out


def _dataset():
    from megatron_hapo.data.datasets import Example

    return [Example([i % 40 + 3, (i * 3) % 40 + 3], f"{i % 40 + 3} {(i * 3) % 40 + 3}", f"t#{i}") for i in range(N_PROMPTS)]


def collect_worker(rank, world, engines, dynamic, echo, max_batches):
    import torch.distributed as dist

    from megatron_hapo.config import RolloutConfig
    from megatron_hapo.data import PromptSampler
    from megatron_hapo.metrics import progress_bar
    from megatron_hapo.rewards import ReasoningGymVerifier, RewardPool
    from megatron_hapo.rollout.collect import Layout, RolloutCollector

    per_engine = world // engines
    engine_index, leader = rank // per_engine, rank % per_engine == 0
    pool = RewardPool(ReasoningGymVerifier(), workers=0) if leader else None
    layout = Layout(world, rank, engines, engine_index, leader, dp=world, dp_rank=rank)
    collector = RolloutCollector(StandInEngine(), pool, 0.0, lambda ids: ["Answer: " + " ".join(map(str, x)) for x in ids],
                                 layout, dist.group.WORLD, seed=5)
    cfg = RolloutConfig(prompts_per_step=4, samples_per_prompt=N_SAMPLES, max_response_tokens=5, dynamic_sampling=dynamic,
                        overlong_buffer=2, max_num_gen_batches=max_batches)
    data = _dataset()
    try:
        batch, position = collector.collect(0, PromptSampler(len(data), seed=1), data, {"echo": echo, "max_tokens": 5},
                                            cfg, None, progress_bar(False, "", 0))
    except RuntimeError as exc:
        return {"error": str(exc)}
    ids, mask = batch.padded()
    t1 = batch.per_position("logprobs_t1", ids.shape[1])
    # alignment: each response token is scored at the position before it, with the engine's record
    for i, (p, r) in enumerate(zip(batch.prompt_ids, batch.response_ids)):
        assert ids[i, len(p): len(p) + len(r)].tolist() == r and mask[i].sum() == len(r)
        assert t1[i][mask[i]].tolist() == pytest.approx(batch.per_token["logprobs_t1"][i].tolist())
    return {"kept": [g.position for g in batch.kept], "seen": len(batch.seen), "position": position,
            "gen_batches": batch.gen_batches, "prompt_ids": batch.prompt_ids, "response_ids": batch.response_ids,
            "rewards": batch.rewards.tolist(), "group_ids": batch.group_ids,
            "kept_rewards": [g.rewards.tolist() for g in batch.kept], "lengths": [g.lengths for g in batch.kept],
            "correct": [g.correct for g in batch.kept]}


@pytest.fixture(scope="module")
def one_rank():
    return run_ranks(1, collect_worker, 1, True, True, 10, timeout=120)[0]


@pytest.mark.parametrize("engines", [2, 1], ids=["an-engine-per-rank", "one-engine-over-two-ranks"])
def test_two_data_parallel_ranks_get_the_one_rank_batch_split(one_rank, engines):
    ranks = run_ranks(2, collect_worker, engines, True, True, 10, timeout=120)
    assert ranks[0]["kept"] == ranks[1]["kept"] == one_rank["kept"]  # the same decisions on every rank and layout
    for key in ("prompt_ids", "response_ids", "rewards"):
        assert ranks[0][key] + ranks[1][key] == one_rank[key], key  # rank d trains on the d-th half, in order
    assert [len(r["prompt_ids"]) for r in ranks] == [2 * N_SAMPLES, 2 * N_SAMPLES]
    assert ranks[0]["group_ids"] == ranks[1]["group_ids"] == [g for g in range(2) for _ in range(N_SAMPLES)]


def test_dynamic_sampling_keeps_informative_groups_and_shapes_overlong(one_rank):
    r = one_rank
    assert len(r["kept"]) == 4 and r["seen"] == 4 * r["gen_batches"] and r["position"] == 4 * r["gen_batches"]
    assert r["gen_batches"] > 1  # the odd seeds' groups are all wrong: more batches were generated
    for correct, rewards, lengths in zip(r["correct"], r["kept_rewards"], r["lengths"]):
        assert any(correct) and not all(correct)
        for c, reward, n in zip(correct, rewards, lengths):  # 1/0, minus DAPO's overlong penalty past 5 - 2 tokens
            assert reward == pytest.approx(float(c) - max(0, n - 3) / 2)


def test_dynamic_sampling_gives_up_naming_what_it_saw():
    out = run_ranks(2, collect_worker, 2, True, False, 2, timeout=120)
    for r in out:
        assert "only 0 of 4 informative groups after 8 groups (2 generation batches" in r["error"]
        assert "the groups seen: 8 all wrong" in r["error"]
