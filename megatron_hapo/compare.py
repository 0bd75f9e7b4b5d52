"""`megatron-hapo compare`: algorithms × seeds on an embedded task, each seed's arms trained from one
shared supervised warm-up, reported with 95 % intervals over seeds.

    megatron-hapo compare --task chain --arms hapo,dapo --seeds 0,1,2 --out runs/compare
    megatron-hapo compare --task chain --arms hapo,dapo --ablations --seeds 0,1,2   # + HAPO without A, B, C or D
    megatron-hapo compare --task multiply --arms hapo,dapo,hapo-no-tools             # the tool task (rollout.tools)
    megatron-hapo compare --task guess --arms hapo,dapo                              # the environment task

Per seed: a warm-up run (teacher-forced, `demo.supervised_warmup`) exported once; then every arm
trains from it with the same seed, data order and budget, so arms differ only in the algorithm
section. Per arm it reports the final held-out greedy accuracy (mean and a t-interval over seeds),
the paired difference to the reference arm per seed (with its interval: the seeds' shared warm-up
makes the pairing meaningful), and the last steps' response length, entropy and temperature; it
writes `summary.json`, `table.md` and PNG curves with bands (min-max over seeds).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import time
from typing import Dict, List, Optional, Sequence, Tuple

from .config import Config
from .spawn import run_ranks
from .plot import read_jsonl

ACC = "eval_mean@1"
COMPONENTS = {"A": "adaptive_temperature", "B": "token_level_advantage", "C": "redistribute", "D": "adaptive_clip"}
# two-sided 95 % Student-t quantiles by degrees of freedom (no scipy here)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]

# per task: the rollout and update sizes of a study run (CPU-sized) and its supervised warm-up
# (steps, lr): chain's model learns the procedure abruptly between 300 and 500 steps at lr 2e-3
# (held-out accuracy 0.4 % at 300, 23 % at 400, 63 % at 500 for seed 0), so 400 leaves RL room
TASKS = {
    "chain": {"rollout.max_response_tokens": 40, "rollout.prompts_per_step": 32, "rollout.samples_per_prompt": 8,
              "train.mini_batch_prompts": 16, "train.micro_batch_size": 64, "rollout.kv_cache_memory_bytes": 256 * 2**20,
              "rollout.max_num_gen_batches": 20},
    "addition": {"rollout.max_response_tokens": 4, "rollout.prompts_per_step": 64, "rollout.samples_per_prompt": 8,
                 "train.mini_batch_prompts": 32, "train.micro_batch_size": 64, "rollout.kv_cache_memory_bytes": 128 * 2**20},
    # the tool task (rollout/tools.py): one call, its result, the answer; the arm without tools is the floor
    "multiply": {"rollout.max_response_tokens": 24, "rollout.prompts_per_step": 16, "rollout.samples_per_prompt": 8,
                 "train.mini_batch_prompts": 8, "train.micro_batch_size": 64, "rollout.kv_cache_memory_bytes": 128 * 2**20,
                 "rollout.max_num_gen_batches": 20, "rollout.tools": "[python]", "rollout.max_turns": 2,
                 "rollout.max_tool_output_tokens": 16, "data.max_prompt_tokens": 16},
    # the environment task (rollout/env_api.py, data/guess.py): up to 4 guesses, each answered higher/lower
    "guess": {"rollout.max_response_tokens": 12, "rollout.prompts_per_step": 16, "rollout.samples_per_prompt": 8,
              "train.mini_batch_prompts": 8, "train.micro_batch_size": 64, "rollout.kv_cache_memory_bytes": 64 * 2**20,
              "rollout.max_num_gen_batches": 20, "rollout.environment": "guess", "rollout.max_turns": 4,
              "rollout.max_tool_output_tokens": 4, "data.max_prompt_tokens": 8},
}
@dataclasses.dataclass(frozen=True)
class Warmup:
    """A study's supervised warm-up per seed: to a band of held-out greedy accuracy (checked every
    `check_every` steps from `first_check` on, on the first `check_prompts` held-out prompts), at
    most `steps` steps; without a band, exactly `steps` steps."""

    steps: int
    lr: float
    band: Optional[Tuple[float, float]] = None
    check_every: int = 20
    first_check: int = 0
    check_prompts: int = 128

    def spec(self) -> dict:
        """What makes two warm-ups the same (for --reuse)."""
        return {"steps": self.steps, "lr": self.lr, "band": list(self.band) if self.band else None,
                "check_every": self.check_every, "first_check": self.first_check, "check_prompts": self.check_prompts}


# chain's model learns the procedure abruptly, somewhere between 300 and 500 steps depending on the seed:
# a fixed count leaves some seeds near 0 (no RL signal) and others near 80 %, so it warms up into a band
WARMUP = {"chain": Warmup(800, 2e-3, band=(0.2, 0.4), first_check=200), "addition": Warmup(300, 1e-3),
          "multiply": Warmup(300, 2e-3), "guess": Warmup(300, 2e-3)}


def arm_overrides(arm: str) -> Dict[str, str]:
    """hapo | dapo | grpo, hapo-released (the authors' released code: sign_mode=released, so confident
    tokens are heated like uncertain ones, and loss_stats=micro_batch_current), hapo-no-X (HAPO with
    component X of A-D off: the paper's ablation), <algorithm>-no-tools (the tool task without
    tools: the floor), or a schedule on two processes, a trainer and an engine: <algorithm>-sep (on
    policy), <algorithm>-offN (N steps off policy, token TIS), <algorithm>-offN-partial (partial rollouts)."""
    if arm in ("hapo", "dapo", "grpo"):
        return {"algorithm.name": arm}
    if arm == "hapo-released":
        return {"algorithm.name": "hapo", "algorithm.sign_mode": "released", "algorithm.loss_stats": "micro_batch_current"}
    if arm.endswith("-no-tools") and arm[:-9] in ("hapo", "dapo", "grpo"):
        # the floor: without tools hardly any group holds a correct answer, so dynamic sampling would
        # give up; off, the arm trains on what it draws and measures what the model does without tools
        return {"algorithm.name": arm[:-9], "rollout.tools": "[]", "rollout.dynamic_sampling": "false"}
    if arm.startswith("hapo-no-") and arm[8:] in COMPONENTS:
        return {"algorithm.name": "hapo", f"algorithm.{COMPONENTS[arm[8:]]}": "false"}
    schedule = re.fullmatch(r"(hapo|dapo|grpo)-(sep|off(\d+)(-partial)?)", arm)
    if schedule:  # the asynchronous schedules: one trainer rank and one engine rank (rollout.placement=separate)
        algo, _, lag, partial = schedule.groups()
        out = {"algorithm.name": algo, "rollout.placement": "separate", "rollout.engine_ranks": "1",
               "rollout.max_staleness": lag or "0", "rollout.partial": "true" if partial else "false"}
        if lag and int(lag) > 0:  # off policy: the behaviour policy's ratio at the recorded temperature, truncated
            out["algorithm.rollout_correction"] = "tis"
        return out
    raise ValueError(f"arm {arm!r}: expected hapo, dapo, grpo, hapo-released, hapo-no-A|B|C|D, <algorithm>-no-tools, "
                     f"<algorithm>-sep or <algorithm>-off<N>[-partial]")


def mean_ci(values: Sequence[float]):
    """(mean, half-width of the 95 % t-interval); half-width nan with one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, _T975[min(n - 2, len(_T975) - 1)] * sd / math.sqrt(n)


def _config(run_dir: str, task: str, **overrides) -> Config:
    items = {"data.train": task, "train.run_dir": run_dir, "train.resume": "none", "log.progress": "off",
             **TASKS[task], **overrides}
    return Config.load(None, [f"{k}={v}" for k, v in items.items()])


def warm_up(trainer, w: Warmup, seed: int) -> Tuple[int, List[float]]:
    """The seed's supervised warm-up (`demo.supervised_warmup`), to `w.band` when it has one: returns
    the steps taken and the NLL per step."""
    from .demo import supervised_warmup

    if w.band is None:
        return w.steps, supervised_warmup(trainer, w.steps, seed=777 + seed)
    done, losses = 0, []
    while done < w.steps:
        n = min(w.steps - done, max(w.first_check - done, w.check_every))
        losses += supervised_warmup(trainer, n, seed=777 + seed, start=done)
        done += n
        acc = trainer.evaluate(w.check_prompts)[ACC]
        print(f"seed {seed}: warm-up step {done}: held-out greedy accuracy {acc:.3f} on {w.check_prompts} prompts "
              f"(band {w.band[0]:g}-{w.band[1]:g})", flush=True)
        if acc >= w.band[0]:  # in the band, or past it if it learned that much between two checks
            break
    return done, losses


def run_compare(out: str, task: str = "chain", arms: Sequence[str] = ("hapo", "dapo"), seeds: Sequence[int] = (0, 1, 2),
                warmup_steps: int = None, steps: int = 30, lr: float = 1e-4, eval_interval: int = 10,
                eval_prompts: int = 0, reference: str = "dapo", extra: Dict[str, str] = None,
                reuse: bool = False, warmup_band: Optional[Tuple[float, float]] = (), final_eval_prompts: int = 0) -> dict:
    """warmup_steps: the warm-up's steps (its maximum with a band; None: the task's); warmup_band: (low,
    high) of held-out accuracy to warm up into, None for a fixed count, () for the task's default.
    eval_prompts: held-out prompts of the intermediate evaluations (0: all); final_eval_prompts: of the
    one after the last step (0: all)."""
    from .trainer import Trainer

    for arm in arms:
        arm_overrides(arm)  # names a bad arm before anything runs
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: expected one of {sorted(TASKS)}")
    w = WARMUP[task]
    w = dataclasses.replace(w, steps=w.steps if warmup_steps is None else warmup_steps,
                            band=w.band if warmup_band == () else warmup_band)
    if w.band is not None and not 0 <= w.band[0] <= w.band[1] <= 1:
        raise ValueError(f"--warmup-band: expected 0 ≤ low ≤ high ≤ 1, got {w.band}")
    warm_steps: Dict[int, int] = {}
    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    runs: Dict[str, Dict[int, dict]] = {arm: {} for arm in arms}
    failed: Dict[str, Dict[int, str]] = {}  # arm -> seed -> why the run failed
    warm_acc = {}
    for seed in seeds:
        root = os.path.join(out, f"seed{seed}")
        common = {"train.seed": seed, "eval.num_prompts": eval_prompts, "eval.final_num_prompts": final_eval_prompts,
                  **(extra or {})}
        record = os.path.join(root, "warmup", "warmup.json")
        if reuse and os.path.exists(record):  # the same seed's warm-up from an earlier compare
            with open(record) as f:
                done = json.load(f)
            spec = done.get("spec") or Warmup(done["steps"], done["lr"]).spec()  # records from before the bands
            if done["task"] != task or spec != w.spec():
                raise ValueError(f"--reuse: {record} is a {done['task']} warm-up {spec}, this study's is {w.spec()}")
            warm_acc[seed], warm_steps[seed] = done["accuracy"], done["steps"]
            print(f"seed {seed}: reusing the warm-up in {root}/warmup (held-out greedy accuracy {warm_acc[seed]:.3f})")
        else:
            shutil.rmtree(root, ignore_errors=True)
            warm = Trainer(_config(f"{root}/warmup", task, **{**common, "train.lr": w.lr, "algorithm.name": "dapo",
                                                               "train.steps": 1}))
            warm_steps[seed], losses = warm_up(warm, w, seed)
            warm_acc[seed] = warm.evaluate(final_eval_prompts)[ACC]
            warm.export_hf(f"{root}/warmup/model")
            warm.close()
            with open(record, "w") as f:
                json.dump({"task": task, "steps": warm_steps[seed], "lr": w.lr, "spec": w.spec(), "accuracy": warm_acc[seed],
                           "nll": [losses[0], losses[-1]]}, f)
            print(f"seed {seed}: warm-up {warm_steps[seed]} steps, NLL {losses[0]:.2f} -> {losses[-1]:.2f}, held-out greedy "
                  f"accuracy {warm_acc[seed]:.3f}", flush=True)
        for arm in arms:
            t1 = time.perf_counter()
            run_dir = f"{root}/{arm}"
            if reuse and _finished(run_dir, steps):
                rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
                runs[arm][seed] = {"final": [m for m in rows if ACC in m][-1][ACC], "rows": rows,
                                   "seconds": sum(m["time_step"] + m.get("time_eval", 0.0) for m in rows)}
                print(f"seed {seed} {arm}: reusing the finished run in {run_dir}", flush=True)
                continue
            shutil.rmtree(run_dir, ignore_errors=True)
            tr = None
            try:
                settings = {**common, **arm_overrides(arm), "model.hf_path": f"{root}/warmup/model", "train.lr": lr,
                            "train.steps": steps, "eval.interval": eval_interval, "eval.before_train": "false"}
                if settings.get("rollout.placement") == "separate":  # a trainer and an engine process
                    run_ranks(1 + int(settings["rollout.engine_ranks"]), _separate_run, run_dir, task, settings,
                              timeout=24 * 3600, init=False)
                else:
                    tr = Trainer(_config(run_dir, task, **settings))  # the arm's settings over the study's
                    tr.fit()
            except Exception as exc:  # noqa: BLE001 - a failed run is a result: recorded, the study goes on
                _record_failure(failed, arm, seed, run_dir, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}")
                continue
            finally:
                if tr is not None:
                    tr.close()
            rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
            bad = next((m["step"] for m in rows if not math.isfinite(m.get("loss", 0.0))), None)
            if bad is not None:  # the trainer skips a step with a non-finite gradient; a study cannot average it
                _record_failure(failed, arm, seed, run_dir, f"non-finite loss at step {bad}")
                continue
            runs[arm][seed] = {"final": [m for m in rows if ACC in m][-1][ACC], "rows": rows,
                               "seconds": time.perf_counter() - t1}
            print(f"seed {seed} {arm}: held-out greedy accuracy {warm_acc[seed]:.3f} -> {runs[arm][seed]['final']:.3f} "
                  f"({runs[arm][seed]['seconds']:.0f} s)", flush=True)
    summary = summarize(runs, warm_acc, reference if reference in arms else arms[0], failed)
    summary.update(task=task, seeds=list(seeds), warmup=w.spec(), warmup_steps=[warm_steps[s] for s in sorted(warm_steps)],
                   steps=steps, lr=lr, wall_s=time.perf_counter() - t0)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = format_table(summary)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    plot_bands(runs, warm_acc, out)
    print(table, flush=True)
    print(f"compare: {out}/summary.json, {out}/table.md, {out}/curves.png; {summary['wall_s']:.0f} s", flush=True)
    return summary


def _separate_run(rank: int, world: int, run_dir: str, task: str, settings: Dict[str, str]) -> None:
    """One arm's run on its own ranks (rollout.placement=separate), every rank of it: `train.run` gives
    each its role (the engine rank serves, the trainer rank trains)."""
    from .train import run

    run(_config(run_dir, task, **settings))


def _record_failure(failed: Dict[str, Dict[int, str]], arm: str, seed: int, run_dir: str, reason: str) -> None:
    """A failed run, whatever failed: in the study's record, in run_dir/failed.json, and said."""
    failed.setdefault(arm, {})[seed] = reason
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "failed.json"), "w") as f:
        json.dump({"reason": reason}, f)
    print(f"seed {seed} {arm}: FAILED ({reason}); the study goes on", flush=True)


def _finished(run_dir: str, steps: int) -> bool:
    """A run of `steps` steps that ended with an evaluation (the metrics row of its last step has it)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    rows = read_jsonl(path)
    return bool(rows) and rows[-1].get("step") == steps and ACC in rows[-1] and len(rows) == steps


def _last(rows, key: str, k: int = 5) -> float:
    vals = [m[key] for m in rows if key in m][-k:]
    return sum(vals) / max(len(vals), 1)


def summarize(runs: Dict[str, Dict[int, dict]], warm_acc: Dict[int, float], reference: str,
              failed: Dict[str, Dict[int, str]] = None) -> dict:
    """Per arm over the seeds it finished (failed runs are listed with their reason, not averaged);
    paired differences over the seeds both the arm and the reference finished."""
    arms, failed = {}, failed or {}
    for arm, by_seed in runs.items():
        seeds = sorted(by_seed)
        if not seeds:
            arms[arm] = {"accuracy": [], "failed": {str(s): r for s, r in failed.get(arm, {}).items()}}
            continue
        finals = [by_seed[s]["final"] for s in seeds]
        mean, ci = mean_ci(finals)
        both = [s for s in seeds if s in runs[reference]]
        paired = [by_seed[s]["final"] - runs[reference][s]["final"] for s in both]
        d_mean, d_ci = mean_ci(paired) if paired else (float("nan"), float("nan"))
        arms[arm] = {
            "seeds": seeds, "failed": {str(s): r for s, r in failed.get(arm, {}).items()},
            "accuracy": finals, "accuracy_mean": mean, "accuracy_ci95": ci,
            "gain_over_warmup_mean": mean_ci([by_seed[s]["final"] - warm_acc[s] for s in seeds])[0],
            f"minus_{reference}": paired, f"minus_{reference}_mean": d_mean, f"minus_{reference}_ci95": d_ci,
            **{f"{key}_last5": mean_ci([_last(by_seed[s]["rows"], key) for s in seeds])[0]
               for key in ("response_length", "entropy", "temperature_mean", "rollout_accuracy", "keep_rate")},
            "seconds_mean": mean_ci([by_seed[s]["seconds"] for s in seeds])[0],
        }
        final_use = [[m["eval_tool_use_rate"] for m in by_seed[s]["rows"] if "eval_tool_use_rate" in m] for s in seeds]
        if all(final_use):  # the tool task with tools: how often the model calls one, held out and sampled
            arms[arm]["tool_use_final"] = [u[-1] for u in final_use]
            arms[arm]["tool_use_final_mean"] = mean_ci(arms[arm]["tool_use_final"])[0]
            arms[arm]["tool_use_rate_last5"] = mean_ci([_last(by_seed[s]["rows"], "tool_use_rate") for s in seeds])[0]
        turns = [[m["eval_turns_per_sample"] for m in by_seed[s]["rows"] if "eval_turns_per_sample" in m] for s in seeds]
        if all(turns):  # multi-turn (tools or an environment): model turns per held-out response, at the end
            arms[arm]["turns_final_mean"] = mean_ci([t[-1] for t in turns])[0]
    return {"reference": reference, "warmup_accuracy": [warm_acc[s] for s in sorted(warm_acc)], "arms": arms}


def format_table(summary: dict) -> str:
    ref = summary["reference"]
    head = (f"| arm | held-out acc (mean ± 95% CI) | per seed | − {ref} (paired, mean ± CI) | gain over warm-up | "
            f"resp. length | entropy | T mean | sampled acc | s/run |")
    tools = any("tool_use_final_mean" in a for a in summary["arms"].values())
    if tools:
        head += " tool use held-out | tool use sampled |"
    turns = any("turns_final_mean" in a for a in summary["arms"].values())
    if turns:
        head += " turns held-out |"
    lines = [head, "|" + "|".join("---" for _ in head.split("|")[1:-1]) + "|"]
    for arm, a in summary["arms"].items():
        def pm(m, c):
            return f"{m:.3f} ± {c:.3f}" if c == c else f"{m:.3f}"

        if not a["accuracy"]:
            lines.append(f"| {arm} | no run finished | — | — | — | — | — | — | — | — |" + (" — | — |" if tools else "")
                         + (" — |" if turns else ""))
            continue

        diff = "—" if arm == ref else pm(a[f"minus_{ref}_mean"], a[f"minus_{ref}_ci95"])
        lines.append(f"| {arm} | {pm(a['accuracy_mean'], a['accuracy_ci95'])} | {', '.join(f'{v:.3f}' for v in a['accuracy'])} | "
                     f"{diff} | {a['gain_over_warmup_mean']:+.3f} | {a['response_length_last5']:.1f} | {a['entropy_last5']:.3f} | "
                     f"{a['temperature_mean_last5']:.3f} | {a['rollout_accuracy_last5']:.3f} | {a['seconds_mean']:.0f} |"
                     + (f" {a['tool_use_final_mean']:.3f} | {a['tool_use_rate_last5']:.3f} |" if "tool_use_final_mean" in a
                        else " — | — |" if tools else "")
                     + ((f" {a['turns_final_mean']:.2f} |" if "turns_final_mean" in a else " — |") if turns else ""))
    warm, steps = summary["warmup_accuracy"], summary.get("warmup_steps") or [None] * len(summary["warmup_accuracy"])
    lines.append("\nwarm-up per seed (held-out accuracy after steps): "
                 + ", ".join(f"{v:.3f}" + (f" after {n}" if n is not None else "") for v, n in zip(warm, steps)))
    for arm, a in summary["arms"].items():
        for seed, reason in a.get("failed", {}).items():
            lines.append(f"failed: {arm} seed {seed}: {reason}")
    return "\n".join(lines)


def plot_bands(runs: Dict[str, Dict[int, dict]], warm_acc: Dict[int, float], out: str) -> None:
    """curves.png: held-out accuracy, response length, entropy, temperature per step; the line is
    the mean over seeds, the band min-max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(ACC, "held-out greedy accuracy"), ("response_length", "response length"), ("entropy", "entropy (old pass)"),
              ("temperature_mean", "sampling temperature (mean)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels):
        for arm, by_seed in runs.items():
            series = []
            for s, run in sorted(by_seed.items()):
                pts = {m["step"]: m[key] for m in run["rows"] if key in m}
                if key == ACC:
                    pts[0] = warm_acc[s]
                series.append(pts)
            steps = sorted(set.intersection(*(set(p) for p in series))) if series else []
            if not steps:
                continue
            vals = [[p[x] for p in series] for x in steps]
            ax.plot(steps, [sum(v) / len(v) for v in vals], label=arm)
            ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="megatron-hapo compare", description=__doc__.splitlines()[0])
    p.add_argument("--task", default="chain", choices=sorted(TASKS))
    p.add_argument("--arms", default="hapo,dapo",
                   help="comma-separated: hapo, dapo, grpo, hapo-released, hapo-no-A|B|C|D, <algorithm>-no-tools (multiply)")
    p.add_argument("--ablations", action="store_true", help="add hapo-no-A, hapo-no-B, hapo-no-C, hapo-no-D")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="the warm-up's steps, its maximum with a band; default: the task's (chain 800, addition 300, multiply 300)")
    p.add_argument("--warmup-band", default="task",
                   help="LOW,HIGH: warm up until the held-out greedy accuracy reaches LOW (checked every 20 steps on 128 "
                        "prompts), so seeds start RL from comparable points; 'none': a fixed --warmup-steps; "
                        "default: the task's (chain 0.2,0.4; the others none)")
    p.add_argument("--final-eval-prompts", type=int, default=0,
                   help="held-out prompts of the evaluation after the last step (0: all); --eval-prompts is the intermediate ones'")
    p.add_argument("--steps", type=int, default=30, help="RL steps per arm and seed")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-interval", type=int, default=10)
    p.add_argument("--eval-prompts", type=int, default=0, help="0: the whole held-out split")
    p.add_argument("--reference", default="dapo", help="the arm paired differences are taken against")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--reuse", action="store_true",
                   help="keep the warm-ups and finished arm runs an earlier compare left in --out (same task and "
                        "steps): add arms or seeds to a study without rerunning what it has")
    p.add_argument("--verbose", action="store_true", help="also the third-party warnings known to be harmless")
    p.add_argument("overrides", nargs="*", help="config overrides for every run, key.sub=value")
    a = p.parse_args(argv)
    from . import quiet

    quiet.install(a.verbose or "log.verbose=true" in a.overrides)  # before Megatron and vLLM load
    arms = [x for x in a.arms.split(",") if x] + ([f"hapo-no-{c}" for c in COMPONENTS] if a.ablations else [])
    extra = dict(item.split("=", 1) for item in a.overrides)
    band = () if a.warmup_band == "task" else None if a.warmup_band == "none" else tuple(float(x) for x in a.warmup_band.split(","))
    summary = run_compare(a.out, a.task, arms, [int(s) for s in a.seeds.split(",")], a.warmup_steps, a.steps, a.lr,
                          a.eval_interval, a.eval_prompts, a.reference, extra, a.reuse, band, a.final_eval_prompts)
    return exit_code(summary, a.out)


def exit_code(summary: dict, out: str = "") -> int:
    """1 when a whole arm has no finished run (the study has nothing to say about it), else 0: failed
    runs of some seeds are results, reported in the table."""
    empty = [arm for arm, x in summary["arms"].items() if not x["accuracy"]]
    if empty:
        print(f"compare: no run of {', '.join(empty)} finished (reasons in {out}/table.md)", flush=True)
    return 1 if empty else 0
