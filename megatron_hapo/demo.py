"""The embedded demo (`make demo`): Megatron-Core updates, vLLM rollouts, on this CPU.

2-digit addition, a character vocabulary and a Qwen2-shaped model (2 layers, hidden 128, 0.5 M
parameters) built in code. A short supervised warm-up brings it to partial accuracy; then HAPO and
DAPO each train from that same warm-up with the same budget and seeds, from reward alone. It
prints held-out greedy accuracy before and after each and writes the reward curves to
runs/demo/comparison.png. The numbers are whatever they are: more supervised steps would reach
high accuracy faster; the point is learning from reward through the whole stack.
"""
from __future__ import annotations

import json
import os
import time

from .config import Config


def _config(run_dir, **overrides):
    items = [f"train.run_dir={run_dir}", "train.resume=none"] + [f"{k}={v}" for k, v in overrides.items()]
    return Config.load(None, items)


def _plot(runs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, metrics in runs.items():
        steps = [m["step"] for m in metrics]
        axes[0].plot(steps, [m["rollout_accuracy"] for m in metrics], label=name)
        axes[1].plot(steps, [m["entropy"] for m in metrics], label=name)
        axes[2].plot(steps, [m["temperature_max"] - m["temperature_min"] for m in metrics], label=name)
    for ax, title in zip(axes, ("sampled accuracy (all rollouts)", "policy entropy (old pass)", "temperature range per step")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def run_demo(root: str = "runs/demo", warmup_steps: int = 300, rl_steps: int = 60, algorithms=("hapo", "dapo")) -> dict:
    from .trainer import Trainer

    t0 = time.perf_counter()
    common = {"rollout.max_response_tokens": 4, "rollout.prompts_per_step": 64, "rollout.samples_per_prompt": 8,
              "train.mini_batch_prompts": 64, "train.micro_batch_size": 64, "rollout.kv_cache_memory_bytes": 128 * 2**20}
    warm = Trainer(_config(f"{root}/warmup", **common, **{"train.lr": 1e-3, "algorithm.name": "dapo", "train.steps": 1}))
    acc0 = warm.evaluate()
    losses = warm.supervised_warmup(warmup_steps)
    acc_warm = warm.evaluate()
    warm.export_hf(f"{root}/warmup/model")
    warm.close()
    print(f"supervised warm-up: {warmup_steps} steps, NLL {losses[0]:.2f} -> {losses[-1]:.2f}, held-out greedy accuracy "
          f"{acc0:.3f} -> {acc_warm:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    results, curves = {}, {}
    for algo in algorithms:
        t1 = time.perf_counter()
        run_dir = f"{root}/{algo}"
        if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
            os.remove(os.path.join(run_dir, "metrics.jsonl"))
        tr = Trainer(_config(run_dir, **common, **{"model.hf_path": f"{root}/warmup/model", "algorithm.name": algo,
                                                   "train.lr": 1e-4, "train.steps": rl_steps, "train.save_interval": 0}))
        before = tr.evaluate()
        history = tr.fit()
        after = tr.evaluate()
        tr.close()
        results[algo] = {"before": before, "after": after, "seconds": time.perf_counter() - t1,
                         "sampled_first": history[0]["rollout_accuracy"],
                         "sampled_last": sum(m["rollout_accuracy"] for m in history[-5:]) / 5}
        curves[algo] = history
        print(f"{algo}: held-out greedy accuracy {before:.3f} -> {after:.3f}; sampled accuracy "
              f"{results[algo]['sampled_first']:.3f} -> {results[algo]['sampled_last']:.3f} (all rollouts, mean of the last 5 steps); "
              f"{rl_steps} steps in {results[algo]['seconds']:.0f} s", flush=True)
    _plot(curves, f"{root}/comparison.png")
    with open(f"{root}/summary.json", "w") as f:
        json.dump({"warmup": {"before": acc0, "after": acc_warm}, **results}, f, indent=2)
    print(f"plot: {root}/comparison.png; summary: {root}/summary.json; total {time.perf_counter() - t0:.0f} s")
    return results
