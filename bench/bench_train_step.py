"""Training throughput and peak memory of one HAPO update step of the Megatron policy.

    .venv/bin/python bench/bench_train_step.py [--tp 1,2] [--steps 3] [--hidden 256 --layers 4 --seq 256 --batch 8]

For each TP size it spawns TP gloo ranks; in the same processes it times the baseline: the same
model in Hugging Face transformers (one process), the same HAPO loss on full-vocabulary
log-probs and torch AdamW. Tokens/s counts all tokens through the model; memory is the peak
resident memory above the level before the step, on rank 0. Medians over --steps after one warm-up.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def model_config(args):
    import transformers

    return transformers.AutoConfig.for_model(
        model_type="qwen2", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 32, num_key_value_heads=2,
        rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=args.seq, tie_word_embeddings=True)


def make_batch(args):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    mask = torch.zeros(args.batch, args.seq, dtype=torch.bool)
    mask[:, args.seq // 4:-1] = True
    adv = torch.randn(args.batch, generator=g)
    return ids, mask, adv


def timed(fn, steps):
    from megatron_hapo.memory import PeakRSS

    times, peaks = [], []
    for i in range(steps + 1):
        with PeakRSS() as m:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        if i:
            times.append(dt)
            peaks.append(m.extra)
    return statistics.median(times), max(peaks)


def baseline_step_fn(hf, ids, mask, adv, algo):
    """HF transformers forward, full-vocabulary log-probs, the same loss, torch AdamW."""
    import torch

    from megatron_hapo.algorithms import compute_policy_loss, entropy_stats, normalized_entropy
    from megatron_hapo.parallel import vocab_parallel_logprobs_and_entropy

    opt = torch.optim.AdamW(hf.parameters(), lr=1e-6, weight_decay=0.1)
    labels = torch.zeros_like(ids)
    labels[:, :-1] = ids[:, 1:]
    with torch.no_grad():
        old, ent = vocab_parallel_logprobs_and_entropy(hf(ids).logits, labels)
    h = normalized_entropy(ent, entropy_stats(ent, mask))

    def step():
        opt.zero_grad()
        logp, _ = vocab_parallel_logprobs_and_entropy(hf(ids).logits, labels)
        loss, _ = compute_policy_loss(algo, logp, old, adv, mask, h_hat=h)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()

    return step


def rank_main(rank, world, args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    import transformers

    from megatron_hapo.algorithms import AlgorithmConfig, entropy_stats, normalized_entropy
    from megatron_hapo.models.hf_config import ModelSpec
    from megatron_hapo.training.parallel import init_model_parallel
    from megatron_hapo.training.policy import MegatronPolicy, PolicyBatch, PolicyConfig

    init_model_parallel(world, 1)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(model_config(args), dtype=torch.float32)
    algo = AlgorithmConfig.preset("hapo")
    ids, mask, adv = make_batch(args)
    policy = MegatronPolicy(ModelSpec.from_hf(hf.config),
                            PolicyConfig(tensor_model_parallel_size=world, micro_batch_size=args.micro, lr=1e-6,
                                         lr_warmup_steps=0, logprob_chunk_size=1024), algo)
    policy.load_hf_state_dict(hf.state_dict())
    old, ent = policy.compute_logprobs(PolicyBatch(ids, mask))
    batch = PolicyBatch(ids, mask, advantages=adv, old_logp=old, h_hat=normalized_entropy(ent, entropy_stats(ent, mask)))
    dist.barrier()
    t_meg, m_meg = timed(lambda: policy.train_step(batch), args.steps)
    dist.barrier()
    if rank == 0:
        t_base, m_base = timed(baseline_step_fn(hf, ids, mask, adv, algo), args.steps)
        params = sum(p.numel() for p in hf.parameters())
        result = dict(tp=world, t_meg=t_meg, m_meg=m_meg, t_base=t_base, m_base=m_base, params=params)
    dist.barrier()
    return result if rank == 0 else None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", default="1,2")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per layout before every rank is stopped")
    args = p.parse_args()
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    from megatron_hapo.spawn import run_ranks

    tokens = args.batch * args.seq
    print(f"HAPO train step (forward+backward+optimizer), Qwen2-shaped hidden {args.hidden}, {args.layers} layers, "
          f"vocab {args.vocab}, {args.batch}x{args.seq} tokens, micro-batch {args.micro}, fp32, {os.cpu_count()} CPU cores")
    print("baseline: the same model in HF transformers + the same loss + torch AdamW, one process, same machine")
    head = "| TP | params | megatron s | tokens/s | baseline s | baseline tokens/s | speed ratio | megatron GiB (rank 0) | baseline GiB | memory ratio |"
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|", flush=True)
    for world in (int(x) for x in args.tp.split(",")):
        r = run_ranks(world, rank_main, args, timeout=args.timeout)[0]
        gib = 2**30
        print(f"| {r['tp']:>2} | {r['params'] / 1e6:.1f}M | {r['t_meg']:>10.3f} | {tokens / r['t_meg']:>8.0f} | "
              f"{r['t_base']:>10.3f} | {tokens / r['t_base']:>17.0f} | {r['t_base'] / r['t_meg']:>10.2f}x | "
              f"{r['m_meg'] / gib:>21.3f} | {r['m_base'] / gib:>12.3f} | {r['m_base'] / max(r['m_meg'], 1):>11.2f}x |", flush=True)


if __name__ == "__main__":
    main()
