"""Synchronous vs one step off vs staleness 2 with partial rollouts, on the same model and ranks.

    .venv/bin/python bench/bench_async.py [--steps 6] [--hidden 256] [--layers 4] [--max-tokens 256]

Each mode is one run of `rollout.placement=separate` on two processes (launched like torchrun:
rank 0 trains, rank 1 hosts the vLLM engine; one thread each, so the two really run at once on a
2-core machine): `sync` (max_staleness 0: the engine waits for every update, the trainer for every
rollout), `off1` (one step off: step k+1's rollout runs while step k trains) and `off2-partial`
(staleness 2, partial rollouts: a new version lands between decoding steps). The model is built
here: Qwen2-shaped, random, over the addition tokenizer's 32 pieces, so a response ends at EOS
with probability ~1/32 a token: geometric lengths with a long tail (64 responses a step: the
longest ~4× the mean), capped at --max-tokens.

Per mode, over the steps after the first (start-up): steps per hour, the median over steps of
step time / max(generation, training) of that step (training = old pass + update + weight
sync; generation = the engine's busy time for the step's rollouts; 1.0 = perfect overlap; the
goal for one step off is ≤ 1.15), trainer and engine idle fractions, weight transfer time and
bytes, staleness. Ratios are against `sync`, run by the same invocation.
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

MODES = {"sync": ["rollout.max_staleness=0"],
         "off1": ["rollout.max_staleness=1", "algorithm.rollout_correction=tis"],
         "off2-partial": ["rollout.max_staleness=2", "rollout.partial=true", "rollout.stale=wait",
                          "algorithm.rollout_correction=tis"]}


def build_model(out: str, hidden: int, layers: int, positions: int) -> None:
    from megatron_hapo.data.addition import build_tokenizer, qwen2_config, save_model_dir

    save_model_dir(out, qwen2_config(hidden=hidden, intermediate=2 * hidden, layers=layers, max_positions=positions),
                   build_tokenizer, seed=0)


def worker(rank, world, run_dir, model, steps, max_tokens, extra):
    import torch

    from megatron_hapo.config import Config
    from megatron_hapo.train import run

    torch.set_num_threads(1)
    cfg = Config.load(None, [f"train.run_dir={run_dir}", "train.resume=none", f"train.steps={steps}",
                             f"model.hf_path={model}", "data.train=addition", "reward.type=exact",
                             "rollout.placement=separate", "rollout.engine_ranks=1", "rollout.prompts_per_step=8",
                             "rollout.samples_per_prompt=8", f"rollout.max_response_tokens={max_tokens}",
                             "data.max_prompt_tokens=16", "train.mini_batch_prompts=4", "train.micro_batch_size=8",
                             f"rollout.kv_cache_memory_bytes={256 * 2**20}", "rollout.dynamic_sampling=false",
                             "eval.at_end=false", "log.progress=off", "log.tensorboard=false", "train.lr=1e-4",
                             "reward.workers=0", *extra])
    t0 = time.perf_counter()
    history = run(cfg)  # the engine rank serves until the trainer stops it: None there
    return {"history": history or [], "wall": time.perf_counter() - t0}


def summarize(history) -> dict:
    rows = history[1:]  # the first step waits for the engine's start-up
    train = [m["time_old_pass"] + m["time_train"] + m["time_weight_sync"] for m in rows]
    ratio = [m["time_step"] / max(m["time_generate"], t) for m, t in zip(rows, train)]
    return {"steps_per_hour": 3600 * len(rows) / sum(m["time_step"] for m in rows),
            "step_s": statistics.median(m["time_step"] for m in rows),
            "generate_s": statistics.median(m["time_generate"] for m in rows),
            "train_s": statistics.median(train),
            "overlap": statistics.median(ratio),
            "trainer_idle": statistics.mean(m["trainer_idle_frac"] for m in rows),
            "engine_idle": statistics.mean(m["engine_idle_frac"] for m in rows),
            "sync_s": statistics.median(m["time_weight_sync"] for m in rows),
            "sync_mb": rows[0]["weight_sync_bytes"] / 2**20,
            "staleness": statistics.mean(m.get("staleness_mean", 0.0) for m in rows),
            "versions": max(m.get("versions_per_response_max", 1.0) for m in rows),
            "length": statistics.mean(m["response_length"] for m in rows),
            "length_max": max(m["response_length_max"] for m in rows)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--modes", default=",".join(MODES))
    a = p.parse_args()
    from megatron_hapo.spawn import run_ranks

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "model")
        build_model(model, a.hidden, a.layers, 16 + a.max_tokens)
        for mode in a.modes.split(","):
            res = run_ranks(2, worker, os.path.join(tmp, mode), model, a.steps, a.max_tokens, MODES[mode],
                            timeout=3600, init=False)[0]
            out[mode] = summarize(res["history"])
            print(f"{mode}: done ({res['wall']:.0f} s)", flush=True)
    base = out.get("sync")
    print(f"\n{a.steps - 1} steps a mode after one start-up step; 64 responses a step (8 prompts × 8), random Qwen2 "
          f"hidden {a.hidden}, {a.layers} layers; one trainer process, one engine process\n")
    print("| mode | steps/h | vs sync | step s | generate s | train s | step / max(gen, train) | trainer idle | "
          "engine idle | sync s | sync MB | staleness | versions/resp | len mean / max |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for mode, s in out.items():
        vs = f"{s['steps_per_hour'] / base['steps_per_hour']:.2f}x" if base else "-"
        print(f"| {mode} | {s['steps_per_hour']:.0f} | {vs} | {s['step_s']:.2f} | {s['generate_s']:.2f} | "
              f"{s['train_s']:.2f} | {s['overlap']:.2f} | {s['trainer_idle']:.2f} | {s['engine_idle']:.2f} | "
              f"{s['sync_s']:.3f} | {s['sync_mb']:.1f} | {s['staleness']:.2f} | {s['versions']:.0f} | "
              f"{s['length']:.0f} / {s['length_max']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
