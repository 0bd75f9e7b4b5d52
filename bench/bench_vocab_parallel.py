"""Time and peak memory of log-probs + entropy (forward + backward) on vocabulary-sharded logits.

    .venv/bin/python bench/bench_vocab_parallel.py [--quick] [--tp 1,2] [--chunk 512] [--dtype float32]

For each (tokens, vocab) and TP size it runs, in the same processes, the naive path (gather the
full vocabulary, log_softmax, entropy; what most RL stacks did first) and
`vocab_parallel_logprobs_and_entropy` with chunking, and prints one table with the ratios.
Memory is the peak resident memory above the level before the call, on rank 0, including the
logits' gradient (which both paths must produce). Timings are medians; never used in tests.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = [(2048, 32768), (8192, 32768), (4096, 151936)]
QUICK = [(1024, 8192), (2048, 32768)]


def naive(local, target, temp, group, rank, world):
    import torch
    import torch.distributed as dist

    if world > 1:
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.detach().contiguous(), group=group)
        full = torch.cat(parts, dim=-1).requires_grad_()
        del parts
    else:
        full = local
    logp_all = torch.log_softmax(full.float() / temp[:, None], dim=-1)
    logp = logp_all.gather(-1, target[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    logp.sum().backward()
    if world > 1:
        shard = local.shape[-1]
        local.grad = full.grad[:, rank * shard:(rank + 1) * shard].clone()
    return entropy


def chunked(local, target, temp, group, chunk):
    from megatron_hapo.parallel import vocab_parallel_logprobs_and_entropy

    logp, entropy = vocab_parallel_logprobs_and_entropy(local, target, temp, group=group, chunk_size=chunk)
    logp.sum().backward()
    return entropy


def measure(fn, local, repeats):
    import torch.distributed as dist

    from megatron_hapo.memory import PeakRSS

    times, peaks = [], []
    for i in range(repeats + 1):
        local.grad = None
        if dist.is_initialized():
            dist.barrier()
        with PeakRSS() as m:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        if i:  # the first run warms up
            times.append(dt)
            peaks.append(m.extra)
    return statistics.median(times), max(peaks)


def run_shape(rank, world, tokens, vocab, chunk, dtype_name, repeats):
    import torch
    import torch.distributed as dist

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    group = dist.group.WORLD if world > 1 else None
    shard = vocab // world
    local = (torch.randn(tokens, shard) * 2).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (tokens,))
    temp = torch.rand(tokens) * 0.2 + 0.9
    # The naive path holds ~5 fp32 copies of the full logits on every rank; skip it rather than
    # let the kernel's OOM killer take a rank down mid-collective.
    naive_need = 5 * tokens * vocab * 4 * world
    fits = naive_need < 0.8 * available_bytes()
    t_naive = m_naive = err = float("nan")
    if fits:
        t_naive, m_naive = measure(lambda: naive(local, target, temp, group, rank, world), local, repeats)
        g_naive = local.grad.clone()
    t_ours, m_ours = measure(lambda: chunked(local, target, temp, group, chunk), local, repeats)
    if fits:
        err = (local.grad.float() - g_naive.float()).abs().max().item()
    return dict(tokens=tokens, vocab=vocab, tp=world, t_naive=t_naive, t_ours=t_ours, m_naive=m_naive, m_ours=m_ours,
                err=err, naive_need=naive_need)


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def rank_main(rank, world, shapes, chunk, dtype_name, repeats):
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    rows = [run_shape(rank, world, t, v, chunk, dtype_name, repeats) for t, v in shapes]
    return rows if rank == 0 else None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    p.add_argument("--tp", default="1,2")
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per layout before every rank is stopped")
    args = p.parse_args()
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # freed tensors must go back to the kernel for RSS peaks
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable] + sys.argv)

    from megatron_hapo.spawn import run_ranks

    shapes = QUICK if args.quick else SHAPES
    gib = 2**30
    print(f"vocab-parallel log-probs + entropy, forward+backward, {args.dtype} logits, chunk {args.chunk} tokens, "
          f"{os.cpu_count()} CPU cores; memory = peak RSS above the inputs on rank 0 (incl. the logits' gradient)")
    head = f"| {'tokens':>6} | {'vocab':>6} | TP | naive s | ours s | speed-up | naive GiB | ours GiB | memory ratio | max grad diff |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|", flush=True)
    skipped = False
    for world in (int(x) for x in args.tp.split(",")):
        for r in run_ranks(world, rank_main, shapes, args.chunk, args.dtype, args.repeats, timeout=args.timeout)[0]:
            if r["t_naive"] != r["t_naive"]:  # NaN: naive path skipped
                skipped = True
                print(f"| {r['tokens']:>6} | {r['vocab']:>6} | {r['tp']:>2} | skipped | {r['t_ours']:>6.3f} | {'n/a':>8} | "
                      f"{'>' + format(r['naive_need'] / world / gib, '.0f'):>9} | {r['m_ours'] / gib:>8.2f} | {'n/a':>12} | {'n/a':>13} |",
                      flush=True)
                continue
            print(f"| {r['tokens']:>6} | {r['vocab']:>6} | {r['tp']:>2} | {r['t_naive']:>7.3f} | {r['t_ours']:>6.3f} | "
                  f"{r['t_naive'] / r['t_ours']:>7.2f}x | {r['m_naive'] / gib:>9.2f} | {r['m_ours'] / gib:>8.2f} | "
                  f"{r['m_naive'] / max(r['m_ours'], 1):>11.2f}x | {r['err']:>13.1e} |", flush=True)
    if skipped:
        print("skipped: the naive path would need more memory per rank than this machine has (estimate: 5 fp32 copies "
              "of the full logits per rank); chunked ours ran.")


if __name__ == "__main__":
    main()
