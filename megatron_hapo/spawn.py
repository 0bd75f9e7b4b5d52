"""Run a function on N real gloo processes and collect results (or tracebacks): the one way the
tests and the bench scripts start multi-rank runs.

Every run has a wall-clock limit: a rank that dies inside a collective would hang the others,
so on timeout every rank is killed and the test fails with what each rank said.
"""
from __future__ import annotations

import datetime
import io
import multiprocessing as mp
import os
import queue
import socket
import traceback

import torch
import torch.distributed as dist


class RanksFailed(AssertionError):
    """A rank raised; the message holds every failed rank's traceback."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Modules a fork server imports once for every later run (`preload`); None: each run spawns fresh interpreters.
_PRELOAD = {"modules": None}


def preload(modules) -> None:
    """Later `run_ranks` processes start by fork from one server process that imported `modules` once
    (multiprocessing's forkserver), instead of as fresh interpreters that import torch, Megatron and
    vLLM again (about 10 s of CPU each here). Each run still gets new processes with no state of an
    earlier run: the server only imports, it never runs anything, and holds no thread when it forks.
    What a fork cannot give, a run asks for with `run_ranks(..., fresh=True)`: an interpreter whose
    imports are still to come (a module made missing at start-up, shims applied once per process)."""
    _PRELOAD["modules"] = list(modules) if modules else None


def _worker(rank, world_size, port, fn, args, results, timeout, init=True, env=None):
    if env is not None:  # a fork server's child starts with the server's environment: the caller's, as now
        os.environ.clear()
        os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        if init:  # else fn sets torch.distributed up from the environment (rollout.placement=separate splits it)
            dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout))
        out = fn(rank, world_size, *args)
        buf = io.BytesIO()  # plain bytes: tensors shared through file descriptors die with the worker
        torch.save(out, buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except (ValueError, RuntimeError):  # vLLM may already have torn the group down
                pass


def run_ranks(world_size: int, fn, *args, timeout: float = 240.0, init: bool = True, fresh: bool = False):
    """fn(rank, world_size, *args) on world_size gloo processes; returns the results by rank. init=False:
    the processes get only the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT), as under torchrun.
    fresh=True: new interpreters even where `preload` set a fork server up."""
    if _PRELOAD["modules"] and not fresh:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD["modules"])
        env = dict(os.environ)
    else:
        ctx, env = mp.get_context("spawn"), None
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results, timeout, init, env), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    got, errors = {}, []
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while len(got) + len(errors) < world_size:
            if errors:  # a failed rank leaves the others blocked in a collective: short grace, then stop
                deadline = min(deadline, datetime.datetime.now() + datetime.timedelta(seconds=15))
            remaining = (deadline - datetime.datetime.now()).total_seconds()
            if remaining <= 0:
                if errors:
                    break
                raise TimeoutError(f"{world_size}-rank run exceeded {timeout:.0f}s; finished: {sorted(got)}; errors: {errors}")
            try:
                rank, status, payload = results.get(timeout=min(remaining, 5.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in got]
                if dead and results.empty():
                    raise RuntimeError(f"ranks {dead} died (exit codes {[procs[i].exitcode for i in dead]}); errors: {errors}")
                continue
            if status == "ok":
                got[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise RanksFailed("\n".join(errors))
    return [got[r] for r in range(world_size)]
