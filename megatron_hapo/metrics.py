"""A step's metrics: one table of what each number is (its TensorBoard group), the reductions that
make them the same on every rank, and where they go (metrics.jsonl, TensorBoard, the console,
token samples for `megatron-hapo plot`).

Rollout metrics come from the global group summaries (identical on every rank). Per-token numbers
measured on each data-parallel rank's share are reduced as sums and counts, so a mean is over all
tokens of the step, whatever the split (not a mean of per-rank means).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

# TensorBoard group of every metric a step or an evaluation reports; names not listed fall back
# on the prefix rules below (eval_<...>, mem_<phase>_<...>, moe_<...>), then on "train".
GROUPS = {
    "rollout": ("reward", "reward_std", "accuracy", "rollout_accuracy", "response_length", "response_length_max",
                "response_tokens", "truncated_frac", "reward_timeouts", "reward_errors", "rollout_errors", "keep_rate",
                "gen_batches", "rollout_tokens_per_s"),
    "train": ("loss", "clip_frac_low", "clip_frac_high", "clip_frac_dual", "hapo_adv_changed_frac",
              "hapo_bounds_changed_frac", "policy_drift", "grad_norm", "skipped", "lr", "tokens", "tokens_per_s",
              "adv_fallback_frac", "rollout_correction_weight_mean",
              "rollout_correction_ratio_mean", "rollout_correction_hit_frac", "padding_factor"),
    "entropy": ("entropy", "entropy_q", "entropy_sigma", "entropy_z_pos", "entropy_z_neg"),
    "temperature": ("temperature_min", "temperature_max", "temperature_mean"),
    "mismatch": ("logp_mismatch_mean", "logp_mismatch_max", "ratio_bias", "logp_mismatch_at_t_mean",
                 "logp_mismatch_at_t_max"),
    "time": ("time_rollout", "time_old_pass", "time_train", "time_weight_sync", "time_step", "time_eval"),
    "data": ("data_position", "data_epoch", "data_skipped_rows"),
    "weight_sync": ("weight_sync_bytes",),
}
_TAG = {name: group for group, names in GROUPS.items() for name in names}
_PREFIXES = (("eval_", "eval"), ("mem_", "memory"), ("moe_", "moe"))


def tb_tag(key: str) -> str:
    if key.startswith("eval/"):  # per-benchmark: eval/<benchmark>/mean@n
        return key
    group = _TAG.get(key) or next((g for p, g in _PREFIXES if key.startswith(p)), "train")
    return f"{group}/{key}"


def mean_over_micro_batches(parts: List[Dict[str, float]]) -> Dict[str, float]:
    return {k: sum(x[k] for x in parts) / len(parts) for k in parts[0]}


def reduce_step_sums(mismatch: Optional[torch.Tensor], mismatch_at_t: Optional[torch.Tensor], fallback: torch.Tensor,
                     group) -> Dict[str, float]:
    """Token-weighted mismatches (at T = 1 and at the recorded per-token T; each the output of
    `algorithms.logprob_mismatch_sums` on one rank's share) and the GRPO-fallback share over the
    data-parallel group (host tensors: gloo on GPU nodes too). Mismatches None (no trainer pass to
    compare with, rollout.old_logprobs=engine): the fallback share only."""
    counts = torch.tensor([float(fallback.sum()), float(fallback.numel())], dtype=torch.float64)
    if mismatch is None:
        dist.all_reduce(counts, group=group)
        return {"adv_fallback_frac": counts[0].item() / max(counts[1].item(), 1.0)}
    sums = torch.cat([mismatch[:3], mismatch_at_t[:3], counts])
    mx = torch.stack([mismatch[3], mismatch_at_t[3]])
    dist.all_reduce(sums, group=group)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
    if sums[2].item() == 0:  # no token sampled under the pass's weights (one step off): nothing to compare
        return {"adv_fallback_frac": sums[6].item() / max(sums[7].item(), 1.0)}
    tokens = max(sums[2].item(), 1.0)
    return {"logp_mismatch_mean": sums[0].item() / tokens, "ratio_bias": sums[1].item() / tokens,
            "logp_mismatch_max": mx[0].item(), "logp_mismatch_at_t_mean": sums[3].item() / tokens,
            "logp_mismatch_at_t_max": mx[1].item(), "adv_fallback_frac": sums[6].item() / max(sums[7].item(), 1.0)}


def rollout_metrics(kept, seen, gen_batches: int) -> Dict[str, float]:
    """From the global group summaries of a step (kept: trained on; seen: every group generated)."""
    def flat(groups, attr):
        return [v for g in groups for v in getattr(g, attr)]

    kept_rewards = torch.cat([torch.as_tensor(g.rewards, dtype=torch.float32) for g in kept])
    lengths = flat(kept, "lengths")
    temps = [g.temps for g in kept if g.temps is not None] or [(1.0, 1.0, 1.0, 1)]
    statuses = flat(seen, "statuses")
    all_correct, kept_correct = flat(seen, "correct"), flat(kept, "correct")
    return {**tool_metrics(seen),
        "reward": kept_rewards.mean().item(), "reward_std": kept_rewards.std().item() if kept_rewards.numel() > 1 else 0.0,
        "accuracy": sum(kept_correct) / max(len(kept_correct), 1),
        "rollout_accuracy": sum(all_correct) / max(len(all_correct), 1),
        "response_length": sum(lengths) / max(len(lengths), 1), "response_length_max": float(max(lengths)),
        "response_tokens": float(sum(lengths)),
        "truncated_frac": sum(g.truncated for g in kept) / max(len(lengths), 1),
        "reward_timeouts": float(statuses.count("timeout")), "reward_errors": float(statuses.count("error")),
        "rollout_errors": float(statuses.count("rollout_error")),
        "keep_rate": len(kept) / max(len(seen), 1), "gen_batches": float(gen_batches),
        "temperature_min": min(t[0] for t in temps), "temperature_max": max(t[1] for t in temps),
        "temperature_mean": sum(t[2] for t in temps) / max(sum(t[3] for t in temps), 1),
    }


def tool_metrics(groups, prefix: str = "") -> Dict[str, float]:
    """Multi-turn rollouts (rollout.tools, rollout.environment): model turns per response; with tools, tool
    calls, errors and timeouts summed over the responses generated, the share of responses that called a
    tool and the accuracy of those that did; empty for single-turn runs."""
    rows = [(t, c) for g in groups if g.tools for t, c in zip(g.tools, g.correct)]
    if not rows:
        return {}
    n = len(rows)
    out = {f"{prefix}turns_per_sample": sum(t[-1] for t, _ in rows) / n}
    if len(rows[0][0]) == 1:  # an environment without tools: (turns,)
        return out
    used = [c for t, c in rows if t[0]]
    return {f"{prefix}tool_calls": float(sum(t[0] for t, _ in rows)), f"{prefix}tool_errors": float(sum(t[1] for t, _ in rows)),
            f"{prefix}tool_timeouts": float(sum(t[2] for t, _ in rows)), **out,
            f"{prefix}tool_use_rate": len(used) / n, f"{prefix}tool_use_accuracy": sum(used) / max(len(used), 1)}


def eval_metrics(groups, n: int, sources: List[str]) -> Dict[str, float]:
    """mean@n and pass@n over evaluated groups (n samples each; `sources[i]`: group i's benchmark).
    With several benchmarks, each gets `eval/<name>/mean@n` and `pass@n`, and `eval_mean@n` /
    `eval_pass@n` are the average of the per-benchmark scores (the paper's "average", not a pool of
    all problems); with one they are its scores. Also what the verifier could not score."""
    by_source: Dict[str, List[int]] = {}
    for g, s in zip(groups, sources):
        by_source.setdefault(s, []).append(sum(g.correct))
    scores = {s: (sum(c) / (len(c) * n), sum(x > 0 for x in c) / len(c)) for s, c in by_source.items()}
    lengths = [x for g in groups for x in g.lengths]
    out = {f"eval_mean@{n}": sum(m for m, _ in scores.values()) / len(scores),
           f"eval_pass@{n}": sum(p for _, p in scores.values()) / len(scores)}
    if len(scores) > 1:
        for s, (mean, pass_) in scores.items():
            out.update({f"eval/{s}/mean@{n}": mean, f"eval/{s}/pass@{n}": pass_, f"eval/{s}/prompts": float(len(by_source[s]))})
    return {**out, **tool_metrics(groups, "eval_"), "eval_response_length": sum(lengths) / max(len(lengths), 1),
            "eval_prompts": float(len(groups)),
            "eval_reward_timeouts": float(sum(g.statuses.count("timeout") for g in groups)),
            "eval_reward_errors": float(sum(g.statuses.count("error") for g in groups))}


def step_line(m: Dict[str, Any]) -> str:
    line = (f"step {m['step']:>4} reward {m['reward']:+.3f} acc {m['rollout_accuracy']:.3f} (kept {m['accuracy']:.3f}) "
            f"len {m['response_length']:.1f} entropy {m['entropy']:.3f} T [{m['temperature_min']:.3f}, "
            f"{m['temperature_max']:.3f}] clip {m['clip_frac_low']:.3f}/{m['clip_frac_high']:.3f} "
            + (f"mismatch {m['logp_mismatch_mean']:.1e} " if "logp_mismatch_mean" in m
               else f"stale {m['staleness_mean']:.2f} " if "staleness_mean" in m else "old π: engine ")
            + f"keep {m['keep_rate']:.2f} {m['time_step']:.1f}s")
    if m["reward_timeouts"] or m["reward_errors"]:
        line += f" reward timeouts {m['reward_timeouts']:.0f} errors {m['reward_errors']:.0f}"
    evals = {k: v for k, v in m.items() if k.startswith("eval_mean@") or k.startswith("eval_pass@")}
    if evals:
        line += " | " + " ".join(f"{k} {v:.3f}" for k, v in evals.items())
        if m.get("eval_reward_timeouts") or m.get("eval_reward_errors"):
            line += f" eval reward timeouts {m['eval_reward_timeouts']:.0f} errors {m['eval_reward_errors']:.0f}"
    return line


def eval_line(m: Dict[str, Any]) -> str:
    quiet = ("eval_reward_timeouts", "eval_reward_errors")  # shown when non-zero
    line = "eval: " + " ".join(f"{k} {v:.3f}" for k, v in m.items() if k.startswith("eval_") and (k not in quiet or v))
    per_source = [f"{k[5:]} {v:.3f}" for k, v in m.items() if k.startswith("eval/") and "@" in k]
    return line + (" | " + " ".join(per_source) if per_source else "")


class _NoBar:
    n = 0

    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def progress_bar(enabled: bool, desc: str, total: int):
    """A tqdm bar on rank 0 with log.progress on; an object that ignores updates otherwise."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


class RunLogger:
    """metrics.jsonl, TensorBoard scalars and histograms, token samples, console lines (rank 0 only)."""

    def __init__(self, run_dir: str, tensorboard: bool, token_samples: int, enabled: bool):
        self.run_dir, self.tensorboard, self.token_samples, self.enabled = run_dir, tensorboard, token_samples, enabled
        self.writer, self.start_step = None, 0

    def _tb(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard hides the events a killed attempt logged past the checkpoint
            self.writer = SummaryWriter(os.path.join(self.run_dir, "tensorboard"), purge_step=self.start_step + 1)
        return self.writer

    def rewind(self, step: int) -> None:
        """The run (re)starts after step `step` (0: from scratch): rows a killed attempt logged past
        the checkpoint it resumes from are dropped (they are logged again, as they come), and so is a
        row cut by the kill; metrics.jsonl and token_samples.jsonl then read as one uninterrupted run."""
        self.start_step = step
        if not self.enabled:
            return
        for name in ("metrics.jsonl", "token_samples.jsonl"):
            path = os.path.join(self.run_dir, name)
            if not os.path.exists(path):
                continue
            with open(path) as f:
                lines = f.read().splitlines()
            kept = []
            for line in lines:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a row cut by the kill
                if 0 < row.get("step", 0) <= step or (step > 0 and row.get("step") == 0):
                    kept.append(line)
            if len(kept) != len(lines):
                tmp = f"{path}.tmp"
                with open(tmp, "w") as f:
                    f.write("".join(x + "\n" for x in kept))
                os.replace(tmp, path)

    def log(self, m: Dict[str, Any], echo: str = "step") -> None:
        """One metrics row: metrics.jsonl, TensorBoard scalars, a console line."""
        if not self.enabled:
            return
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(m) + "\n")
        if self.tensorboard:
            for key, value in m.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb().add_scalar(tb_tag(key), value, m["step"])
            self._tb().flush()
        print(step_line(m) if echo == "step" else eval_line(m), flush=True)

    def log_distributions(self, step: int, hist: Dict[str, Optional[torch.Tensor]], entropies: List[np.ndarray],
                          temperatures: List[np.ndarray]) -> None:
        """A step's per-token distributions as TensorBoard histograms, and up to `token_samples`
        (engine entropy, temperature) pairs in token_samples.jsonl for the plots."""
        if not self.enabled:
            return
        if self.tensorboard:
            for key, values in hist.items():
                if values is not None and values.numel():
                    self._tb().add_histogram(f"distributions/{key}", values.float(), step)
        n = self.token_samples
        if n <= 0:
            return
        ent = np.concatenate(entropies or [np.zeros(0, np.float32)])
        temp = np.concatenate(temperatures or [np.zeros(0, np.float32)])
        if ent.size > n:
            pick = np.sort(np.random.default_rng(step).choice(ent.size, n, replace=False))
            ent, temp = ent[pick], temp[pick]
        with open(os.path.join(self.run_dir, "token_samples.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "entropy": np.round(ent, 5).tolist(),
                                "temperature": np.round(temp, 5).tolist()}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
