"""No helper process outlives the rank that started it.

torchrun and srun kill a job by process group or cgroup, which takes every helper along. A rank
killed alone (the OOM killer, `kill -9` on a run started without torchrun) would leave its helpers
running forever: reward workers block on a queue whose write end they hold themselves, and
Megatron's checkpoint writer keeps a multiprocessing Manager server with no parent check. Each
helper therefore asks the kernel to SIGKILL it when its parent dies (PR_SET_PDEATHSIG): the
reward workers (their initializer), the sandboxes (their preexec), and the Manager, which this
module starts in Megatron's place so that it can pass the initializer.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
from typing import Optional

_PR_SET_PDEATHSIG = 1


def libc():
    """The C library, for the prctl/unshare/mount calls Python's os module lacks (3.11)."""
    return ctypes.CDLL(None, use_errno=True)


def die_with_parent(parent_pid: Optional[int] = None) -> None:
    """In a child: SIGKILL when the parent thread's process exits; exits at once if the parent is
    already gone (it died before this ran)."""
    libc().prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def own_checkpoint_writer_manager() -> None:
    """Starts the Manager behind Megatron's checkpoint write-results queue (normally started by
    Megatron at the first save) with die_with_parent; a no-op when it exists or Megatron changed."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        return
    if getattr(fa, "_results_queue", False) is not None:
        return
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    fa._results_queue = manager.Queue()
    fa._hapo_manager = manager  # kept alive with the queue
