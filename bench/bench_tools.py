"""Multi-turn rollouts with tools against single-turn generation of the same model tokens.

    .venv/bin/python bench/bench_tools.py [--warmup-steps 300] [--prompts 64] [--samples 8] [--repeats 3] [--calls 100]

The tool task (`multiply`, rollout.tools=[python]): its model built in code and warmed up the way
`megatron-hapo compare --task multiply` does (a share of the examples call the tool), so that
rollouts hold real calls. Timed, in one process on the same engine and prompts:

- multi-turn: `MultiTurnEngine.generate` (generate until the call closes, run every paused
  trajectory's call in the sandbox in parallel, append the result, continue with prefix caching);
- single-turn: the same prompts, each sample generating exactly as many tokens as its trajectory's
  model tokens in one request (ignore_eos, the HAPO processor on), i.e. the same sampled work with
  no tool round-trips.

Reported: model tokens/s of each and their ratio, the share of the multi-turn wall time spent in
tools (sandbox runs, waited for), the rounds and calls. Medians over --repeats. The multi-turn row
runs twice per repeat: with the tool's pooled sandboxes (a fork server per sandbox, a fresh child
per call: what `rollout.tools=[python]` uses) and with a new sandbox and interpreter per call (the
one-shot `run_python`, as before the pool), in the same process on the same engine.

Then the sandbox's own cost per call: a program that prints one line, `--calls` times one at a time,
pooled against one-shot (median and p90 of the wall time of a call, and the overhead over the
program's own time measured inside the sandbox).
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


def print_trajectory(tok, prompt, r) -> None:
    """One trajectory token by token: who wrote it (model or tool), and for the model's tokens the
    temperature it was sampled at and the entropy of the raw distribution."""
    print(f"\none trajectory: prompt {tok.decode(prompt, skip_special_tokens=True)!r}; tool calls {r.tools[0]}, "
          f"turns {r.tools[3]}, model tokens {sum(r.model_mask)}, tool tokens {len(r.model_mask) - sum(r.model_mask)}")
    print("| # | token | written by | loss mask | T | H |")
    print("|---|---|---|---|---|---|")
    for k, (t, m) in enumerate(zip(r.token_ids, r.model_mask)):
        piece = tok.convert_ids_to_tokens(t)
        extra = f"{r.temperatures[k]:.4f} | {r.entropies[k]:.4f}" if m else "— | —"
        print(f"| {k} | `{piece}` | {'model' if m else 'tool'} | {int(m)} | {extra} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calls", type=int, default=100)
    args = p.parse_args()
    sandbox_table(args.calls)

    from vllm import SamplingParams, TokensPrompt

    from megatron_hapo.compare import _config
    from megatron_hapo.demo import supervised_warmup
    from megatron_hapo.trainer import Trainer

    run_dir = tempfile.mkdtemp(prefix="bench_tools_")
    tr = Trainer(_config(run_dir, "multiply", **{"train.lr": 2e-3, "reward.workers": 0, "train.steps": 1}))
    t0 = time.perf_counter()
    supervised_warmup(tr, args.warmup_steps)
    print(f"warm-up: {args.warmup_steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    mt = tr.source.engine  # the colocated source's MultiTurnEngine
    prompts = [tr.train_data[i].prompt_ids for i in range(args.prompts)]
    seeds = list(range(args.prompts))
    # the step's entropy statistics from one rollout's model tokens (as the trainer's old pass would give):
    # every timed request then samples at its per-token temperature
    import torch

    from megatron_hapo.algorithms import entropy_stats

    probe = [r for rs in mt.generate(prompts[:16], 4, tr.source.sampling, None, seeds=seeds[:16]) for r in rs]
    ents = torch.tensor([h for r in probe for h, m in zip(r.entropies, r.model_mask) if m])
    stats = entropy_stats(ents.view(1, -1), torch.ones(1, ents.numel(), dtype=torch.bool))
    rows = {"multi": [], "fresh": [], "single": []}
    pooled = mt.tool.sandboxes
    for rep in range(args.repeats):
        for mode in ("fresh", "multi"):
            mt.tool.sandboxes = OneShot(mt.tool.limits) if mode == "fresh" else pooled
            mt.tool_seconds = 0.0
            t0 = time.perf_counter()
            out = mt.generate(prompts, args.samples, tr.source.sampling, stats, seeds=[s + 1000 * rep for s in seeds])
            wall = time.perf_counter() - t0
            flat = [r for rs in out for r in rs]
            model = [sum(r.model_mask) for r in flat]
            context = sum(len(r.token_ids) for r in flat)
            calls = sum(r.tools[0] for r in flat)
            if rep == 0 and mode == "multi":
                show = next((r for r in flat if r.tools[0]), flat[0])
                print_trajectory(tr.tokenizer, prompts[show.prompt_index], show)
            rows[mode].append(dict(wall=wall, model=sum(model), context=context, calls=calls, tools=mt.tool_seconds,
                                   rounds=max(r.tools[3] for r in flat)))
        mt.tool.sandboxes = pooled
        # the same model tokens in single-turn requests: sample k of prompt i generates model[k] tokens
        reqs, params = [], []
        for k, (r, n) in enumerate(zip(flat, model)):
            reqs.append(TokensPrompt(prompt_token_ids=list(prompts[k // args.samples])))
            params.append(SamplingParams(n=1, temperature=1.0, max_tokens=max(n, 1), ignore_eos=True, seed=k + 1000 * rep,
                                         logprobs=0, detokenize=False,
                                         extra_args={"hapo": {"tag": f"bench{rep}_{k}", "stats": stats.to_dict()}}))
        t0 = time.perf_counter()
        res = mt.engine.llm.generate(reqs, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        from megatron_hapo.rollout.temperature_processor import RECORDER

        RECORDER.pop({f"bench{rep}_{k}" for k in range(len(flat))})
        rows["single"].append(dict(wall=wall, model=sum(len(x.outputs[0].token_ids) for x in res)))
    tr.close()

    def med(mode, key):
        return statistics.median(r[key] for r in rows[mode])

    m_tps = med("multi", "model") / med("multi", "wall")
    s_tps = med("single", "model") / med("single", "wall")
    print(f"\n{args.prompts} prompts x {args.samples} samples, {args.repeats} repeats (medians); machine: {os.cpu_count()} CPUs")
    print("| mode | model tokens | context tokens | wall s | model tokens/s | vs single-turn | tool calls | rounds | time in tools |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| single-turn, same model tokens | {med('single', 'model'):.0f} | {med('single', 'model'):.0f} | "
          f"{med('single', 'wall'):.2f} | {s_tps:.0f} | 1.00 | 0 | 1 | 0 % |")
    for mode, label in (("fresh", "multi-turn, a new sandbox per call (before)"), ("multi", "multi-turn, pooled sandboxes")):
        tps = med(mode, "model") / med(mode, "wall")
        print(f"| {label} | {med(mode, 'model'):.0f} | {med(mode, 'context'):.0f} | {med(mode, 'wall'):.2f} | "
              f"{tps:.0f} | {tps / s_tps:.2f} | {med(mode, 'calls'):.0f} | {med(mode, 'rounds'):.0f} | "
              f"{100 * med(mode, 'tools') / med(mode, 'wall'):.0f} % |")


class OneShot:
    """The tool's sandbox as before the pool: `run_python`, a new sandbox and interpreter per call."""

    def __init__(self, limits):
        self.limits = limits

    def run(self, source, stdin="", wall_s=None):
        import dataclasses

        from megatron_hapo.rewards.sandbox import run_python

        limits = self.limits if wall_s is None else dataclasses.replace(self.limits, wall_s=wall_s)
        return run_python(source, stdin, limits)


def sandbox_table(calls: int) -> None:
    """Wall time of one call of a one-line program, pooled vs one-shot, one call at a time; the
    program's own time is measured inside the sandbox (it prints its own perf_counter span)."""
    from megatron_hapo.rewards.sandbox import SandboxLimits, sandbox_status
    from megatron_hapo.rewards.sandbox_pool import SandboxPool

    if not sandbox_status()[0]:
        print(f"sandbox unavailable: {sandbox_status()[1]}")
        return
    program = "import time\nt = time.perf_counter()\nprint(6 * 7)\nprint(time.perf_counter() - t)"
    limits = SandboxLimits()
    pool = SandboxPool(limits, workers=1)
    out = {}
    try:
        for name, runner in (("one-shot (before)", OneShot(limits)), ("pooled", pool)):
            runner.run(program)  # a pooled sandbox starts on its first call: not timed
            walls, own = [], []
            for _ in range(calls):
                t0 = time.perf_counter()
                res = runner.run(program)
                walls.append(time.perf_counter() - t0)
                own.append(float(res.stdout.split()[1]))
            walls.sort()
            out[name] = (walls[len(walls) // 2], walls[int(len(walls) * 0.9)], statistics.median(own))
    finally:
        pool.close()
    base = out["one-shot (before)"][0]
    print(f"sandbox cost per call ({calls} calls of a one-line program, one at a time; machine: {os.cpu_count()} CPUs)")
    print("| sandbox | median ms | p90 ms | overhead over the program, median ms | vs one-shot |")
    print("|---|---|---|---|---|")
    for name, (mid, p90, own) in out.items():
        print(f"| {name} | {mid * 1e3:.1f} | {p90 * 1e3:.1f} | {(mid - own) * 1e3:.1f} | {mid / base:.2f} |")
    print(flush=True)


if __name__ == "__main__":
    main()
