"""One RL step, split by phase, with padded and with packed (token-budget) micro-batches.

    .venv/bin/python bench/bench_rl_step.py [--steps 3] [--budget 256] [--synthetic-only | --demo-only]

1. The demo's RL step (built-in addition model, 64 prompts × 8 samples, the demo's settings): a
   Trainer with `train.micro_batch_size` rows, then one with `train.max_tokens_per_micro_batch`,
   in this process; medians over --steps after one warm-up step, per phase (rollout with scoring,
   old pass, update, weight sync) and the padding factor (tokens computed / real tokens).
2. A real-shaped model built in code (Qwen2 layout, hidden 512, 8 layers, vocab 32k) on a synthetic
   long-tailed length mix: 64 sequences, lognormal lengths with median 64 and a cap of 16× the
   median (1024), the old pass and one update, padded vs packed; the padding factor of each.
The baseline of every ratio is the padded run in the same process.
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

PHASES = ("time_rollout", "time_old_pass", "time_train", "time_weight_sync", "time_step")


def demo_step(budget: int, steps: int) -> dict:
    from megatron_hapo.config import Config
    from megatron_hapo.trainer import Trainer

    out = {}
    for name, extra in (("padded", []), ("packed", [f"train.max_tokens_per_micro_batch={budget}"])):
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = Config.load(None, [f"train.run_dir={run_dir}", "train.resume=none", f"train.steps={steps + 1}",
                                     "rollout.max_response_tokens=4", "rollout.prompts_per_step=64",
                                     "rollout.samples_per_prompt=8", "train.mini_batch_prompts=32",
                                     "train.micro_batch_size=64", f"rollout.kv_cache_memory_bytes={128 * 2**20}",
                                     "rollout.dynamic_sampling=false", "eval.at_end=false", "log.progress=off",
                                     "log.tensorboard=false", "train.lr=1e-4", *extra])
            trainer = Trainer(cfg)
            history = trainer.fit()[1:]
            trainer.close()
        out[name] = {k: statistics.median(m[k] for m in history) for k in PHASES + ("padding_factor", "response_tokens")}
    return out


def synthetic(budget: int, steps: int, hidden: int, layers: int, vocab: int) -> dict:
    import torch
    import transformers

    from megatron_hapo.algorithms import AlgorithmConfig
    from megatron_hapo.models.hf_config import ModelSpec
    from megatron_hapo.training.parallel import destroy_model_parallel, init_model_parallel
    from megatron_hapo.training.policy import MegatronPolicy, PolicyBatch, PolicyConfig

    g = torch.Generator().manual_seed(0)
    n, median, cap = 64, 64, 1024
    lengths = torch.exp(torch.randn(n, generator=g) * 1.0 + torch.log(torch.tensor(float(median)))).clamp(16, cap).long()
    width = int(lengths.max())
    ids = torch.randint(0, vocab, (n, width), generator=g)
    pos = torch.arange(width)
    mask = (pos[None] >= 8) & (pos[None] < lengths[:, None] - 1)  # 8 prompt tokens, the rest a response
    adv = torch.randn(n, generator=g)
    hf_cfg = transformers.AutoConfig.for_model(
        model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=2, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=cap, tie_word_embeddings=True)
    out = {"lengths": {"median": float(lengths.median()), "max": int(lengths.max()), "mean": float(lengths.float().mean())}}
    init_model_parallel(1, 1)
    try:
        for name, pack in (("padded", 0), ("packed", budget)):
            torch.manual_seed(0)
            policy = MegatronPolicy(ModelSpec.from_hf(hf_cfg), PolicyConfig(micro_batch_size=8, lr=1e-5,
                                                                          max_tokens_per_micro_batch=pack),
                                    AlgorithmConfig.preset("dapo"))
            times = {"time_old_pass": [], "time_train": []}
            for i in range(steps + 1):
                t0 = time.perf_counter()
                old, _ = policy.compute_logprobs(PolicyBatch(ids, mask))
                t1 = time.perf_counter()
                policy.train_step(PolicyBatch(ids, mask, advantages=adv, old_logp=old))
                t2 = time.perf_counter()
                counts = policy.take_token_counts()
                if i:
                    times["time_old_pass"].append(t1 - t0)
                    times["time_train"].append(t2 - t1)
            out[name] = {k: statistics.median(v) for k, v in times.items()}
            out[name]["padding_factor"] = counts["tokens_computed"] / counts["tokens_real"]
            del policy
    finally:
        destroy_model_parallel()
    return out


def table(title: str, rows: dict, keys) -> None:
    print(f"\n{title}")
    print(f"{'phase':18s} {'padded':>10s} {'packed':>10s} {'packed/padded':>14s}")
    for k in keys:
        a, b = rows["padded"][k], rows["packed"][k]
        unit = "" if k == "padding_factor" else " s"
        print(f"{k:18s} {a:>8.3f}{unit:2s} {b:>8.3f}{unit:2s} {b / max(a, 1e-12):>13.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--budget", type=int, default=256, help="train.max_tokens_per_micro_batch of the demo run")
    p.add_argument("--synthetic-budget", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--demo-only", action="store_true")
    p.add_argument("--synthetic-only", action="store_true")
    a = p.parse_args()
    print(f"machine: {os.cpu_count()} CPUs; medians over {a.steps} steps after one warm-up")
    if not a.synthetic_only:
        rows = demo_step(a.budget, a.steps)
        table(f"demo RL step (addition model, 512 responses; packed budget {a.budget} tokens)", rows,
              PHASES + ("padding_factor",))
    if not a.demo_only:
        rows = synthetic(a.synthetic_budget, a.steps, a.hidden, a.layers, a.vocab)
        ln = rows.pop("lengths")
        table(f"real-shaped model (hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}), 64 sequences, lognormal "
              f"lengths median {ln['median']:.0f} mean {ln['mean']:.0f} max {ln['max']}; packed budget "
              f"{a.synthetic_budget} tokens", rows, ("time_old_pass", "time_train", "padding_factor"))


if __name__ == "__main__":
    main()
