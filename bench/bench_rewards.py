"""Scored responses per second for each verifier family, and the sandbox's per-run overhead.

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

    from megatron_hapo.rewards import CodeVerifier, MathVerifier, ReasoningGymVerifier, SandboxLimits, run_python, score_batch, sandbox_status

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
    print(f"\nper run: plain `python3 -c pass` {plain * 1000:.0f} ms, in the sandbox {boxed * 1000:.0f} ms "
          f"(overhead {1000 * (boxed - plain):.0f} ms, {boxed / plain:.1f}x)")


if __name__ == "__main__":
    main()
