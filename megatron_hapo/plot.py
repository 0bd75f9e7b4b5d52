"""`megatron-hapo plot RUN_DIR [RUN_DIR ...]`: PNG charts from runs' metrics.jsonl and token_samples.jsonl.

    curves.png                 reward, sampled accuracy, eval accuracy, entropy, response length and the
                               per-step temperature range of every run, on shared axes
    distributions.png          token entropy and sampling temperature, early vs late steps, per run
    temperature_vs_entropy.png the temperature each token was sampled at against its entropy, per run
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List


def read_jsonl(path: str) -> List[dict]:
    """Rows of a JSONL file; a torn last line (a run killed mid-write) is ignored."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n != len(lines) - 1:
                raise ValueError(f"{path}:{n + 1}: not valid JSON")
    return rows


def load_run(run_dir: str) -> Dict[str, list]:
    metrics = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    if not metrics:
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl with any step (is it a megatron-hapo run folder?)")
    # a resumed run may repeat steps after its last checkpoint: the later record wins
    by_step = {}
    for m in metrics:
        by_step[m["step"]] = {**by_step.get(m["step"], {}), **m}
    return {"metrics": [by_step[s] for s in sorted(by_step)],
            "tokens": read_jsonl(os.path.join(run_dir, "token_samples.jsonl"))}


def _label(run_dir: str) -> str:
    return os.path.basename(os.path.normpath(run_dir)) or run_dir


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


CURVES = (("reward", "reward (kept groups)"), ("rollout_accuracy", "sampled accuracy (all rollouts)"), ("eval", "eval accuracy"),
          ("entropy", "policy entropy (old pass)"), ("response_length", "response length"), ("temperature", "sampling temperature"))


def plot_curves(runs: Dict[str, List[dict]], path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (key, title) in zip(axes.flat, CURVES):
        for label, metrics in runs.items():
            train = [m for m in metrics if "reward" in m]
            steps = [m["step"] for m in train]
            if key == "eval":
                evals = [(m["step"], v) for m in metrics for k, v in m.items() if k.startswith("eval_mean@")]
                if evals:
                    ax.plot(*zip(*evals), marker="o", label=label)
            elif key == "temperature":
                line, = ax.plot(steps, [m["temperature_mean"] for m in train], label=label)
                ax.fill_between(steps, [m["temperature_min"] for m in train], [m["temperature_max"] for m in train],
                                color=line.get_color(), alpha=0.2)
            elif train and key in train[0]:
                ax.plot(steps, [m[key] for m in train], label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _halves(tokens: List[dict], key: str):
    if not tokens:
        return [], []
    cut = max(1, len(tokens) // 3)
    early = [v for row in tokens[:cut] for v in row[key]]
    late = [v for row in tokens[-cut:] for v in row[key]]
    return early, late


def plot_distributions(runs: Dict[str, List[dict]], path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 3.5 * len(runs)), squeeze=False)
    for row, (label, tokens) in zip(axes, runs.items()):
        for ax, key in zip(row, ("entropy", "temperature")):
            early, late = _halves(tokens, key)
            if early:
                ax.hist(early, bins=50, alpha=0.5, density=True, label=f"first steps ({tokens[0]['step']}..)")
                ax.hist(late, bins=50, alpha=0.5, density=True, label=f"last steps (..{tokens[-1]['step']})")
                ax.legend()
            ax.set_title(f"{label}: token {key}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_temperature_vs_entropy(runs: Dict[str, List[dict]], path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5), squeeze=False)
    for ax, (label, tokens) in zip(axes[0], runs.items()):
        ent = [v for row in tokens for v in row["entropy"]]
        temp = [v for row in tokens for v in row["temperature"]]
        step = [row["step"] for row in tokens for _ in row["entropy"]]
        if ent:
            points = ax.scatter(ent, temp, c=step, s=3, cmap="viridis", alpha=0.6)
            fig.colorbar(points, ax=ax, label="step")
        ax.set_xlabel("token entropy (T = 1)")
        ax.set_ylabel("sampling temperature")
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_runs(run_dirs: List[str], out_dir: str) -> List[str]:
    loaded = {}
    for d in run_dirs:
        label = _label(d)
        while label in loaded:
            label += "'"
        loaded[label] = load_run(d)
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in ("curves.png", "distributions.png", "temperature_vs_entropy.png")]
    plot_curves({k: v["metrics"] for k, v in loaded.items()}, paths[0])
    tokens = {k: v["tokens"] for k, v in loaded.items()}
    plot_distributions(tokens, paths[1])
    plot_temperature_vs_entropy(tokens, paths[2])
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="megatron-hapo plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", help="run folders (train.run_dir of each run)")
    p.add_argument("--out", default=None, help="where the PNGs go (default: RUN_DIR/plots for one run, ./plots for several)")
    a = p.parse_args(argv)
    out = a.out or (os.path.join(a.run_dirs[0], "plots") if len(a.run_dirs) == 1 else "plots")
    for path in plot_runs(a.run_dirs, out):
        print(path)
    return 0
