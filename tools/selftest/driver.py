"""The driver: runs the tiers' checks in order under a budget, each in this process or (isolated) a
child of its own, and writes the JSON and the table after every check."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Optional

import torch

from megatron_hapo import device as dev

from . import engines, measure, multi, stack, te, trainer, training  # noqa: F401  (each registers its tier's checks)
from .core import CHECKS, ENTRY, PREFLIGHT, ROOT, Check, Ctx, Skip, check_imports, compile_preflight, installed, resolve_spec


def _not_installed(c: Check) -> Optional[str]:
    missing = [m for m in c.needs if not installed(m)]
    return f"skipped: not installed ({', '.join(missing)})" if missing else None


def run_check(c: Check, ctx: Ctx) -> tuple:
    """(status, figure) of one check in this process."""
    if _not_installed(c):
        return "skipped", _not_installed(c)
    try:
        figure, ok = c.fn(ctx)
        return ("pass" if ok else "FAIL"), figure
    except Skip as exc:
        return "skipped", str(exc)
    except Exception as exc:  # a failing layer: say where, keep going with the others
        traceback.print_exc()
        return "FAIL", f"{type(exc).__name__}: {str(exc)[:300]}"


def run_isolated(c: Check, layer_spec: str, work: str, timeout: float) -> tuple:
    """One check in a child process of its own (a fresh vLLM state); its result comes back as JSON."""
    if _not_installed(c):
        return "skipped", _not_installed(c)
    out = os.path.join(work, f"child-{CHECKS.index(c)}.json")
    cmd = [sys.executable, ENTRY, "--child", c.name, "--out", out, "--layer-spec", layer_spec]
    # a world of its own: not the rendezvous this process's single-rank world took
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=max(timeout, 30))
    except subprocess.TimeoutExpired:
        return "FAIL", f"the child process ran past {timeout:.0f} s"
    if not os.path.exists(out):
        tail = (res.stderr.strip().splitlines() or [""])[-1][:300]
        return "FAIL", f"the child process exited {res.returncode} without a result: {tail}"
    with open(out) as f:
        r = json.load(f)["results"][0]
    return r["status"], r["figure"] + " (own process)"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def table(results, where) -> str:
    w = max(len(r["check"]) for r in results)
    lines = [f"GPU self-test on {where}", f"| {'check':<{w}} | status  | seconds | peak GiB | figure"]
    for r in results:
        peak = "" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
        lines.append(f"| {r['check']:<{w}} | {r['status']:<7} | {r['seconds']:>7.1f} | {peak:>8} | {r['figure']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The GPU self-test: proves the GPU path layer by layer in minutes.")
    p.add_argument("--out", default="gpu_selftest.json", help="the JSON results")
    p.add_argument("--table", help="also write the table to this file")
    p.add_argument("--skip", default="", help="comma-separated check-name fragments to skip (e.g. trainer,2 GPUs)")
    p.add_argument("--only", default="", help="comma-separated check-name fragments to run")
    p.add_argument("--layer-spec", default="auto", choices=("auto", "te", "local"),
                   help="the spec the training checks build (auto: TE where a GPU and Transformer Engine are there)")
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds: checks not started by then are skipped (the order puts the most important first)")
    p.add_argument("--multi-on-cpu", action="store_true", help="run the 2-rank check over gloo without GPUs (tests)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # one check, by exact name, in this process (isolated checks)
    p.add_argument("--check-imports", action="store_true",
                   help="only import what the checks need; exit 2 naming the first missing module")
    a = p.parse_args(argv)
    if a.check_imports:
        return check_imports()
    skip = [s for s in a.skip.split(",") if s]
    only = [s for s in a.only.split(",") if s]
    dev.set_current()
    spec = resolve_spec(a.layer_spec)
    checks = sorted(CHECKS, key=lambda c: c.tier)  # stable: definition order within a tier
    if a.child:
        checks = [c for c in checks if c.name == a.child]
    PREFLIGHT["compile"] = compile_preflight()
    if PREFLIGHT["compile"] and not a.child:
        print(f"preflight: the fused temperature kernel cannot compile here: {PREFLIGHT['compile']}; "
              f"its checks will say so", flush=True)
    results, t_start = [], time.perf_counter()

    def write(final: bool) -> str:
        """The JSON and the table as they stand: after every check, so a timeout or a kill keeps what finished."""
        where = (f"{torch.cuda.get_device_name()}, {torch.cuda.device_count()} GPU(s)" if dev.is_gpu()
                 else "CPU (no GPU)") + f"; torch {torch.__version__}; layer spec {spec}; " \
            f"{time.perf_counter() - t_start:.0f} s" + ("" if final else f"; {len(results)} of {len(checks)} checks so far")
        text = table(results, where) if results else f"GPU self-test on {where}: no check finished"
        if a.table:
            _write_atomic(a.table, text + "\n")
        _write_atomic(a.out, json.dumps({"device": where, "layer_spec": spec, "complete": final,
                                         "preflight": PREFLIGHT, "results": results}, indent=2))
        return text

    with tempfile.TemporaryDirectory(prefix="gpu-selftest-") as work:
        ctx = Ctx(work, spec)
        ctx.multi_on_cpu = a.multi_on_cpu
        for c in checks:
            t0 = time.perf_counter()
            left = a.budget - (t0 - t_start) if a.budget else 3600.0
            if not a.child and (any(x in c.name for x in skip) or (only and not any(x in c.name for x in only))):
                status, figure = "skipped", "skipped: not selected"
            elif left <= 0:
                status, figure = "skipped", f"skipped: over the --budget of {a.budget:g} s"
            else:
                if dev.is_gpu():
                    torch.cuda.reset_peak_memory_stats()
                if c.isolated and not a.child:
                    status, figure = run_isolated(c, spec, work, left)
                else:
                    status, figure = run_check(c, ctx)
            peak = torch.cuda.max_memory_allocated() / 2**30 if dev.is_gpu() and status != "skipped" else None
            results.append({"check": c.name, "status": status, "figure": figure, "seconds": round(time.perf_counter() - t0, 2),
                            "peak_gib": None if peak is None else round(peak, 3)})
            write(final=False)
            print(f"[{status:>7}] {c.name}: {figure}", flush=True)
    text = write(final=True)
    if not a.child:
        print("\n" + text)
        print(f"wrote {a.out}" + (f" and {a.table}" if a.table else ""))
    try:
        from megatron_hapo.training.parallel import destroy_model_parallel

        destroy_model_parallel()
    except Exception:
        pass
    return 1 if any(r["status"] == "FAIL" for r in results) else 0
