"""Scored responses per second for each verifier family, the sandbox's per-run overhead, and the
trainer's persistent reward processes (RewardPool) against fresh processes per batch.

    .venv/bin/python bench/bench_rewards.py [--n 64] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    import reasoning_gym

    from megatron_hapo.rewards import (CodeVerifier, MathVerifier, ReasoningGymVerifier, RewardPool, SandboxLimits, run_python,
                                       sandbox_status, score_batch)

    n = args.n
    math_items = [(f"Work...\nAnswer: \\frac{{{i}}}{{{i + 1}}}", f"{i}/{i + 1}") for i in range(n)]
    entries = list(reasoning_gym.create_dataset("knights_knaves", size=n, seed=0))
    logic_items = [(f"<answer>{e['answer']}</answer>", e) for e in entries]
    prog = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    code_items = [(prog, {"inputs": [f"{i} {i}"], "outputs": [str(2 * i)]}) for i in range(n)]
    rows = []
    for name, verifier, items in (("math (math-verify)", MathVerifier(), math_items),
                                  ("logic (reasoning-gym knights_knaves)", ReasoningGymVerifier(), logic_items),
                                  ("code (sandbox, 1 test each)", CodeVerifier(SandboxLimits()), code_items)):
        t0 = time.perf_counter()
        res = score_batch(verifier, [r for r, _ in items], [g for _, g in items], workers=args.workers, timeout_s=60)
        dt = time.perf_counter() - t0
        rows.append((name, n / dt, sum(r.correct for r in res)))
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        subprocess.run(["/usr/bin/python3", "-I", "-c", "pass"], check=True)
    plain = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        run_python("pass")
    boxed = (time.perf_counter() - t0) / reps
    print(f"{os.cpu_count()} CPU cores, {args.workers} scoring processes, {n} responses per family; sandbox: {sandbox_status()[1]}")
    print("| family | responses/s | correct |")
    print("|---|---|---|")
    for name, rate, ok in rows:
        print(f"| {name} | {rate:.1f} | {ok}/{n} |")
    # the trainer's case: one batch of rollouts per step, scored by the same verifier every step
    steps = 5
    texts, truths = [r for r, _ in math_items], [g for _, g in math_items]
    t0 = time.perf_counter()
    for _ in range(steps):
        score_batch(MathVerifier(), texts, truths, workers=args.workers, timeout_s=60)
    fresh = (time.perf_counter() - t0) / steps
    pool = RewardPool(MathVerifier(), workers=args.workers, timeout_s=60)
    pool.score(texts[:2], truths[:2])  # spawn once, as the trainer does at its first step
    t0 = time.perf_counter()
    for _ in range(steps):
        pool.score(texts, truths)
    kept = (time.perf_counter() - t0) / steps
    pool.close()
    t0 = time.perf_counter()
    for _ in range(steps):
        [MathVerifier().score(r, g) for r, g in zip(texts, truths)]
    inline = (time.perf_counter() - t0) / steps
    print(f"\nmath rewards for one step of {n} responses ({steps} steps, mean):")
    print("| scoring | s/step | vs fresh processes |")
    print("|---|---|---|")
    for name, dt in (("fresh processes per batch (score_batch)", fresh), ("persistent processes (RewardPool, the trainer)", kept),
                     ("in the trainer's process (workers=0, no hang protection)", inline)):
        print(f"| {name} | {dt:.3f} | {dt / fresh:.2f}x |")
    print(f"\nper run: plain `python3 -c pass` {plain * 1000:.0f} ms, in the sandbox {boxed * 1000:.0f} ms "
          f"(overhead {1000 * (boxed - plain):.0f} ms, {boxed / plain:.1f}x)")


if __name__ == "__main__":
    main()
