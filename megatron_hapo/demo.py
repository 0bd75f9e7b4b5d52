"""The embedded demo (`make demo`): Megatron-Core updates, vLLM rollouts, on this CPU.

2-digit addition, a sentencepiece tokenizer trained on the task's text and a Qwen2-shaped model
(2 layers, hidden 128, 0.5 M parameters) built in code; a tenth of the pairs are held out. A short supervised warm-up brings it to partial accuracy; then HAPO and
DAPO each train from that same warm-up with the same budget and seeds, from reward alone. It
prints held-out greedy accuracy before and after each and writes the reward curves to
runs/demo/comparison.png (all charts of `megatron-hapo plot` in runs/demo/plots). The numbers are whatever they are: more supervised steps would reach
high accuracy faster; the point is learning from reward through the whole stack.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import List

import torch

from .config import Config
from .data import PromptSampler
from .plot import plot_curves, plot_runs, read_jsonl
from .rollout.collect import pad_rows
from .training.policy import PolicyBatch

ACC = "eval_mean@1"  # greedy accuracy on the 810 held-out pairs


def supervised_warmup(trainer, steps: int, batch_size: int = 64, seed: int = 777, start: int = 0) -> List[float]:
    """Teacher-forced warm-up on the gold answers through the trainer's Megatron update: with a
    fresh old-policy pass each step the ratio is 1 and the loss with A = 1 has the gradient of the
    token-mean negative log-likelihood. An embedded task with a `warmup_target` (multiply: some
    examples call the tool) gives its own responses, a tool's tokens unscored. `start`: the step to
    continue from (a warm-up in several calls sees the data it would have in one). Returns the NLL per
    step; the engine gets the weights."""
    from .data.datasets import EMBEDDED_TASKS, as_sources, embedded_task, source_kind

    sampler = PromptSampler(len(trainer.train_data), seed=seed)
    eos, device = trainer.stop_ids[0], trainer.device
    kind = source_kind(as_sources(trainer.cfg.data.train)[0])
    target = getattr(embedded_task(kind), "warmup_target", None) if kind in EMBEDDED_TASKS else None
    fmt = trainer.tool_format()  # the run's tool-call format (rollout.tools), else None
    losses = []
    for k in range(start, start + steps):
        positions = sampler.indices(k * batch_size, batch_size)
        items = [trainer.train_data[i] for i in positions]
        if target is None:
            answers = [trainer.tokenizer(str(x.ground_truth), add_special_tokens=False)["input_ids"] + [eos] for x in items]
            masks = None
        else:
            prompts = trainer.tokenizer.batch_decode([x.prompt_ids for x in items], skip_special_tokens=True)
            answers, masks = zip(*(target(p, str(x.ground_truth), k * batch_size + n, trainer.tokenizer, fmt)
                                   for n, (p, x) in enumerate(zip(prompts, items))))
        ids, mask = pad_rows([x.prompt_ids + list(a) for x, a in zip(items, answers)], [len(x.prompt_ids) for x in items],
                             [len(a) for a in answers], device, masks)
        old, _ = trainer.policy.compute_logprobs(PolicyBatch(ids, mask))
        h_hat = torch.zeros(ids.shape, device=device) if trainer.algo.uses_entropy else None
        trainer.policy.train_step(PolicyBatch(ids, mask, advantages=torch.ones(len(items), device=device), old_logp=old,
                                              h_hat=h_hat))
        losses.append(-old[mask].mean().item())
    trainer.sync_weights()
    return losses


def _config(run_dir, **overrides):
    items = [f"train.run_dir={run_dir}", "train.resume=none"] + [f"{k}={v}" for k, v in overrides.items()]
    return Config.load(None, items)


def run_demo(root: str = "runs/demo", warmup_steps: int = 300, rl_steps: int = 60, algorithms=("hapo", "dapo")) -> dict:
    from .trainer import Trainer

    t0 = time.perf_counter()
    common = {"rollout.max_response_tokens": 4, "rollout.prompts_per_step": 64, "rollout.samples_per_prompt": 8,
              "train.mini_batch_prompts": 32, "train.micro_batch_size": 64, "rollout.kv_cache_memory_bytes": 128 * 2**20,
              "train.max_tokens_per_micro_batch": 1024}  # packed: padding 1.106 → 1.014 (bench/bench_rl_step.py)
    warm = Trainer(_config(f"{root}/warmup", **common, **{"train.lr": 1e-3, "algorithm.name": "dapo", "train.steps": 1}))
    acc0 = warm.evaluate()[ACC]
    losses = supervised_warmup(warm, warmup_steps)
    acc_warm = warm.evaluate()[ACC]
    warm.export_hf(f"{root}/warmup/model")
    warm.close()
    print(f"supervised warm-up: {warmup_steps} steps, NLL {losses[0]:.2f} -> {losses[-1]:.2f}, held-out greedy accuracy "
          f"{acc0:.3f} -> {acc_warm:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    results, curves = {}, {}
    for algo in algorithms:
        t1 = time.perf_counter()
        run_dir = f"{root}/{algo}"
        shutil.rmtree(run_dir, ignore_errors=True)  # each demo run starts fresh (metrics, events, checkpoints)
        tr = Trainer(_config(run_dir, **common, **{"model.hf_path": f"{root}/warmup/model", "algorithm.name": algo,
                                                   "train.lr": 1e-4, "train.steps": rl_steps, "train.save_interval": 0,
                                                   "eval.before_train": "true", "eval.interval": max(rl_steps // 6, 1)}))
        history = tr.fit()
        evals = [m[ACC] for m in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if ACC in m]
        before, after = evals[0], evals[-1]
        tr.close()
        results[algo] = {"before": before, "after": after, "seconds": time.perf_counter() - t1,
                         "sampled_first": history[0]["rollout_accuracy"],
                         "sampled_last": sum(m["rollout_accuracy"] for m in history[-5:]) / len(history[-5:])}
        curves[algo] = history
        print(f"{algo}: held-out greedy accuracy {before:.3f} -> {after:.3f}; sampled accuracy "
              f"{results[algo]['sampled_first']:.3f} -> {results[algo]['sampled_last']:.3f} (all rollouts, mean of the last 5 steps); "
              f"{rl_steps} steps in {results[algo]['seconds']:.0f} s", flush=True)
    plot_curves({k: read_jsonl(f"{root}/{k}/metrics.jsonl") for k in curves}, f"{root}/comparison.png")
    plot_runs([f"{root}/{k}" for k in curves], f"{root}/plots")
    with open(f"{root}/summary.json", "w") as f:
        json.dump({"warmup": {"before": acc0, "after": acc_warm}, **results}, f, indent=2)
    print(f"plot: {root}/comparison.png; summary: {root}/summary.json; total {time.perf_counter() - t0:.0f} s")
    return results
