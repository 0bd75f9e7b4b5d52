"""Training checkpoints: Megatron distributed checkpoints, written atomically, resumable at any TP/PP.

Layout of a run's checkpoint folder:

    ROOT/iter_0000010/           a complete checkpoint (has COMPLETE); only ever renamed into place
        model + optimizer        megatron dist_checkpointing (layout-independent: load at any TP/PP)
        trainer_state.pt         step, LR schedule, counters (rank 0)
        trainer_state.json       data position, HAPO entropy statistics, the config (human readable)
        rng_rank{R}.pt           every rank's RNG states
        COMPLETE
    ROOT/latest                  "iter_0000010", replaced atomically after the rename
    ROOT/.tmp-iter_0000020/      a save in progress: invisible to `find_latest`, removed on the next save

A process killed at any point of a save leaves the previous checkpoint complete and `latest`
pointing at it (tested with SIGKILL). A save that cannot write (disk full, read-only, quota) is
removed, and every rank raises CheckpointWriteError naming the folder and its free space; the
previous checkpoint stays complete (tested on a full and a read-only tmpfs).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import time
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from .. import device as dev
from ..models.convert import load_sharded, load_state_strict
from ..procs import own_checkpoint_writer_manager

_ITER = re.compile(r"^iter_(\d{7})$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact."""


def _agree(outcome):
    """The first rank's outcome, on every rank (None when no rank had one)."""
    if not dist.is_initialized():
        return outcome
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, outcome)
    return next((o for o in outcomes if o), None)


def _write_failure(root: str, tmp: str, step: int, exc: BaseException) -> tuple:
    """("write", the message CheckpointWriteError carries: what failed, the free space, what is kept)."""
    detail = next((line.strip() for line in reversed(str(exc).splitlines()) if line.strip()), "")
    prev = find_latest(root)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(prev) for f in fs) if prev else 0
    try:
        usage = shutil.disk_usage(root)
        space = f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"
        if usage.free < max(size, 1):
            space = "no room left: " + space
    except OSError as err:
        space = f"free space unknown ({err})"
    kept = f"{prev} is complete and kept" if prev else "there is no earlier checkpoint"
    return "write", (f"checkpoint of step {step}: writing {tmp} failed ({type(exc).__name__}: {detail[:300]}); the filesystem "
            f"of {root} has {space} (a checkpoint takes about {size / 2**20:.1f} MiB); {kept}. Make room or point "
            "train.run_dir elsewhere, then resume with train.resume=auto")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def complete_checkpoints(root: str) -> list:
    """Complete checkpoints under root, oldest first: [(step, path)]."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _ITER.match(name)
        if m and os.path.exists(os.path.join(root, name, "COMPLETE")):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def find_latest(root: str) -> Optional[str]:
    """The newest complete checkpoint (what `--resume auto` loads), or None."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def _chunk_prefix(policy, i: int) -> str:
    return f"model{i}." if len(policy.chunks) > 1 else ""


def _model_sharded(policy) -> dict:
    model_sd = {}
    for i, chunk in enumerate(policy.chunks):
        model_sd.update(chunk.module.sharded_state_dict(prefix=_chunk_prefix(policy, i)))
    return model_sd


def _load_model_state(policy, loaded_model: dict) -> None:
    for i, chunk in enumerate(policy.chunks):
        prefix = _chunk_prefix(policy, i)
        load_state_strict(chunk.module, {k[len(prefix):]: v for k, v in loaded_model.items() if k.startswith(prefix)},
                          "checkpoint")


# fully_reshardable: the distributed optimizer's state in the canonical per-parameter layout, so a
# checkpoint resumes at any TP/PP/DP (Megatron's default for it, fully_sharded_model_space, relies on
# flattened ranges that its torch_dist writer no longer accepts). mem_efficient: a save gathers each
# TP/PP shard's optimizer state onto its data-parallel rank 0 only, over gloo, instead of onto every
# data-parallel rank (about 23 GB of host memory per rank for the 7B recipe; bench/bench_checkpoint.py).
# Megatron reads either form with either setting. Plain optimizers ignore both keys.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                      "distrib_optim_fully_reshardable_mem_efficient": True}


def _sharded(policy, is_loading: bool = False, metadata: Optional[dict] = None):
    model_sd = _model_sharded(policy)
    sd = {"model": model_sd}
    sd["optimizer"] = policy.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                          metadata=dict(metadata or OPTIMIZER_METADATA))
    if not is_loading:
        # the memory-efficient form leaves `param_state` None on data-parallel ranks > 0 (rank 0 writes it):
        # dropped there, so Megatron's check of the common state finds every rank alike instead of warning
        for part in sd["optimizer"].get("chained_optimizers", [sd["optimizer"]]) if isinstance(sd["optimizer"], dict) else []:
            if isinstance(part, dict) and "param_state" in part and part["param_state"] is None:
                del part["param_state"]
    return sd


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(root: str, step: int, policy, trainer_state: Optional[dict] = None, keep_last: Optional[int] = None,
                    blobs: Optional[dict] = None) -> str:
    """Saves a complete checkpoint of step `step` atomically; every rank calls it. Returns its path.
    blobs: {file name: object} that rank 0 pickles into the checkpoint (`read_blob`)."""
    from megatron.core import dist_checkpointing

    if step < 0:
        raise ValueError(f"step: must be ≥ 0, got {step}")
    final = os.path.join(root, f"iter_{step:07d}")
    tmp = os.path.join(root, f".tmp-iter_{step:07d}")
    problem = None  # rank 0's ("exists" | "write", message), agreed on by every rank
    if _rank() == 0:
        try:
            os.makedirs(root, exist_ok=True)
            for name in os.listdir(root):  # leftovers of saves that were killed
                if name.startswith(".tmp-iter_"):
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            if os.path.exists(final):
                problem = "exists", f"checkpoint {final} exists; refusing to overwrite a complete checkpoint"
            else:
                os.makedirs(tmp)
        except OSError as exc:
            problem = _write_failure(root, tmp, step, exc)
    _fail_together(problem, tmp)
    own_checkpoint_writer_manager()  # Megatron's writer Manager, started so that it dies with this rank
    try:
        with dev.megatron_scope():
            dist_checkpointing.save(_sharded(policy), tmp)
        torch.save(rng_state(), os.path.join(tmp, f"rng_rank{_rank()}.pt"))
        if _rank() == 0:
            torch.save({"step": step, "scheduler": policy.scheduler.state_dict(), "steps_done": policy.steps_done,
                        "skipped_steps": policy.skipped_steps}, os.path.join(tmp, "trainer_state.pt"))
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump({"step": step, "layer_spec": policy.layer_spec, "optimizer_parts": _optimizer_parts(policy),
                           "expert_model_parallel_size": getattr(policy, "ep", 1), **(trainer_state or {})}, f, indent=2,
                          default=str)
            for name, obj in (blobs or {}).items():
                with open(os.path.join(tmp, name), "wb") as f:
                    pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
    except BaseException as exc:  # noqa: BLE001 - Megatron wraps ENOSPC in torch's CheckpointException (a BaseException)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        problem = _write_failure(root, tmp, step, exc)
    _fail_together(problem, tmp)
    pause = float(os.environ.get("MEGATRON_HAPO_TEST_PAUSE_BEFORE_COMMIT", "0"))
    if pause and str(step) == os.environ.get("MEGATRON_HAPO_TEST_PAUSE_AT_STEP"):  # tests SIGKILL us here
        open(os.path.join(tmp, "PAUSED"), "w").close()
        time.sleep(pause)
    problem = None
    if _rank() == 0:
        try:
            for name in os.listdir(tmp):  # flush every file before the checkpoint becomes visible
                path = os.path.join(tmp, name)
                if os.path.isfile(path):
                    with open(path, "rb") as f:
                        os.fsync(f.fileno())
            with open(os.path.join(tmp, "COMPLETE"), "w") as f:
                f.write(f"{step}\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            problem = _write_failure(root, tmp, step, exc)
    _fail_together(problem, tmp)
    if _rank() == 0:
        os.rename(tmp, final)
        _fsync_dir(root)
        try:
            _atomic_write(os.path.join(root, "latest"), os.path.basename(final) + "\n")
        except OSError:  # `latest` is a hint: find_latest reads the COMPLETE markers
            pass
        if keep_last is not None:
            for _, old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _fail_together(problem: Optional[tuple], tmp: str) -> None:
    """Every rank raises the first rank's problem: FileExistsError for a complete checkpoint of the
    step, else CheckpointWriteError after the unfinished save is removed (it would hold the space the
    next attempt needs)."""
    problem = _agree(problem)
    if problem is None:
        return
    kind, message = problem
    if kind == "exists":
        raise FileExistsError(message)
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    raise CheckpointWriteError(message)


def load_checkpoint(path: str, policy, load_optimizer: bool = True, load_rng: bool = True) -> dict:
    """Loads a complete checkpoint into the policy (at its own TP/PP and layer spec); returns the trainer state."""
    if not os.path.exists(os.path.join(path, "COMPLETE")):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no COMPLETE marker)")
    if load_optimizer:
        _check_optimizer_parts(path, policy)
    # A fresh torch optimizer has no state yet: build it (zero-step) so the loading dict has every key.
    if load_optimizer:
        _init_optimizer_state(policy)
    with dev.megatron_scope():
        sharded = _sharded(policy, is_loading=True)
    if not load_optimizer:
        sharded.pop("optimizer")
    loaded = load_sharded(sharded, path, path)
    _load_model_state(policy, loaded["model"])
    if load_optimizer:
        with torch.no_grad(), dev.megatron_scope():
            policy.optimizer.load_state_dict(loaded["optimizer"])
        _unshare_step(policy)
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    policy.scheduler.load_state_dict(state["scheduler"])
    policy.steps_done, policy.skipped_steps = state["steps_done"], state["skipped_steps"]
    rng_file = os.path.join(path, f"rng_rank{_rank()}.pt")
    if load_rng and os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def read_blob(path: str, name: str):
    """An object save_checkpoint's `blobs` put in the checkpoint, or None where it has none."""
    file = os.path.join(path, name)
    if not os.path.exists(file):
        return None
    with open(file, "rb") as f:
        return pickle.load(f)


def load_model_checkpoint(path: str, policy) -> None:
    """Loads only the model weights of a Megatron checkpoint (a converted HF model or a training
    checkpoint) into the policy at its own TP/PP and layer spec (either spec's checkpoints load)."""
    with dev.megatron_scope():
        sharded = {"model": _model_sharded(policy)}
    loaded = load_sharded(sharded, path, path)
    _load_model_state(policy, loaded["model"])
    with dev.megatron_scope():
        policy.optimizer.reload_model_params()


def _optimizer_parts(policy) -> int:
    """Megatron chains one optimizer per parameter kind that reduces over its own group: dense
    parameters, and with EP > 1 the experts apart (they reduce over the expert-data-parallel group)."""
    return len(getattr(policy.optimizer, "chained_optimizers", [policy.optimizer]))


def _check_optimizer_parts(path: str, policy) -> None:
    """A chained optimizer's checkpoint keys carry its part index ("chained_1."), so its state loads
    only into the same chain: a MoE checkpoint saved at EP > 1 resumes at EP > 1, one saved at EP 1
    at EP 1. Refused with the way out, before anything is read."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return
    parts = saved.get("optimizer_parts")
    if parts is not None and parts != _optimizer_parts(policy):
        ep = saved.get("expert_model_parallel_size", "?")
        raise ValueError(
            f"checkpoint {path}: its optimizer state is {parts} chained part(s) (saved at expert_model_parallel_size={ep}); "
            f"this run's optimizer has {_optimizer_parts(policy)} (expert_model_parallel_size={getattr(policy, 'ep', 1)}), "
            "and Megatron's chained optimizer state does not reshard across that change. Resume at "
            f"parallel.expert_model_parallel_size={ep}, or start from the checkpoint's weights with a fresh optimizer: "
            f"model.load={path} train.resume=none")


def _torch_adams(policy):
    """The inner optimizers that are torch's own Adam/AdamW: Megatron's CPU fallback. The CPU
    workarounds below apply to them only; Transformer Engine's or apex's FusedAdam (GPU) keep no
    per-parameter `step` and reject one in their state dicts."""
    opt = policy.optimizer
    subs = getattr(opt, "chained_optimizers", [opt])
    return [o.optimizer for o in subs if isinstance(o.optimizer, (torch.optim.Adam, torch.optim.AdamW))]


def _init_optimizer_state(policy) -> None:
    for opt in _torch_adams(policy):
        for group in opt.param_groups:
            for p in group["params"]:
                if p not in opt.state or not opt.state[p]:
                    opt.state[p] = {"step": torch.zeros((), dtype=torch.float32), "exp_avg": torch.zeros_like(p),
                                    "exp_avg_sq": torch.zeros_like(p)}


def _unshare_step(policy) -> None:
    """Megatron restores one shared `step` object into every parameter's state; give each its own."""
    for opt in _torch_adams(policy):
        for state in opt.state.values():
            if "step" in state and isinstance(state["step"], torch.Tensor):
                state["step"] = state["step"].clone()
