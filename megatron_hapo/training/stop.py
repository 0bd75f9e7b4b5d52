"""Graceful stop: a request to save at the next safe point and exit cleanly.

SIGUSR1/SIGTERM (what Slurm's `--signal` sends before the time limit) or a file, `run_dir/STOP` or
$MEGATRON_HAPO_STOP_FILE (what examples/*/launch.slurm touches, since torchrun does not forward
SIGUSR1 to its workers). Ranks agree through one tiny all-reduce per step on the control group.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import List, Optional

import torch
import torch.distributed as dist

STOP_SIGNALS = ("SIGUSR1", "SIGTERM")


class StopRequest:
    def __init__(self, run_dir: str, group):
        self.run_dir, self.group = run_dir, group
        self.signal: Optional[str] = None

    def install(self) -> None:
        """Signal handlers (main thread only; elsewhere the files still work)."""
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            self.signal = signal.Signals(signum).name

        for name in STOP_SIGNALS:
            signal.signal(getattr(signal, name), handler)

    def files(self) -> List[str]:
        files = [os.path.join(self.run_dir, "STOP")]
        if os.environ.get("MEGATRON_HAPO_STOP_FILE"):
            files.append(os.environ["MEGATRON_HAPO_STOP_FILE"])
        return files

    def requested(self) -> Optional[str]:
        """The reason to stop if any rank was asked to."""
        reason = self.signal or next((f for f in self.files() if os.path.exists(f)), None)
        flag = torch.tensor([1.0 if reason else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return (reason or "another rank") if flag.item() else None

    def consume(self) -> None:
        """Removes the stop files, so that the resumed run does not stop at once (rank 0)."""
        for f in self.files():
            if os.path.exists(f):
                os.remove(f)


# ---- phase markers: where a run is, for watchdogs and the kill tests ------------------------------

PHASES = ("rollout", "tools", "scoring", "old_pass", "update", "weight_sync", "checkpoint")  # tools: rollout.tools only
_step = 0


def set_step(step: int) -> None:
    """The step the following markers belong to (the trainer sets it as each step starts)."""
    global _step
    _step = step


def mark(phase: str) -> None:
    """Appends "STEP PHASE" to $MEGATRON_HAPO_PHASE_FILE when set (one line per phase; nothing
    otherwise), and sleeps there when $MEGATRON_HAPO_TEST_HOLD is "STEP:PHASE": how the kill tests
    land inside a phase that lasts milliseconds."""
    path = os.environ.get("MEGATRON_HAPO_PHASE_FILE")
    if path and os.environ.get("RANK", "0") == "0":
        with open(path, "a") as f:
            f.write(f"{_step} {phase}\n")
    if os.environ.get("MEGATRON_HAPO_TEST_HOLD") == f"{_step}:{phase}":
        time.sleep(600)
