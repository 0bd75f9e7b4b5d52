"""One interface for every verifier: `score(response, ground_truth) -> RewardResult`.

A verifier never raises into the trainer: `safe_score` and `score_batch` turn any exception or
time-out into a reward of `failure_reward` with the reason, and count it.
"""
from __future__ import annotations

import ast
import concurrent.futures as cf
import dataclasses
import math
import multiprocessing as mp
import os
import pickle
import re
import signal
import sys
import threading
import traceback
from typing import Any, List, Optional, Sequence

from ..procs import die_with_parent


@dataclasses.dataclass(frozen=True)
class RewardResult:
    score: float
    reason: str
    correct: bool = False
    status: str = "ok"  # "ok" | "error" (the verifier raised) | "timeout" (it hung); the trainer counts these


class Verifier:
    """Subclasses implement `_score`; `score` contains its failures."""

    failure_reward: float = 0.0
    limits = None  # SandboxLimits when the verifier runs programs (the code verifier)

    def _score(self, response: str, ground_truth: Any) -> RewardResult:
        raise NotImplementedError

    def score(self, response: str, ground_truth: Any) -> RewardResult:
        try:
            result = self._score(response, ground_truth)
            if not isinstance(result, RewardResult):
                raise TypeError(f"verifier returned {type(result).__name__}, not RewardResult")
            return result
        except Exception as exc:  # noqa: BLE001 - contained by design
            return RewardResult(self.failure_reward, f"verifier error: {type(exc).__name__}: {exc}"[:500], status="error")


_ANSWER_LINE = re.compile(r"(?i)answer\**\s*[:：]\s*([^\n]+)")  # DAPO-Math's extraction


def extract_answer_line(text: str) -> Optional[str]:
    """The last "Answer: ..." line (DAPO-Math's format), or None."""
    found = _ANSWER_LINE.findall(text or "")
    return found[-1].strip() if found else None


def extract_tagged(text: str, tag: str = "answer") -> Optional[str]:
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", text or "", flags=re.S | re.I)
    return found[-1].strip() if found else None


class _Deadline(BaseException):
    """Raised inside a scoring process when one response's time is up (not an Exception, so a
    verifier's own `except Exception` cannot swallow it)."""


_ARMED = False


def _on_deadline(signum, frame):
    if _ARMED:
        raise _Deadline()


def _worker_score(verifier, response, ground_truth, timeout_s):
    """One response in a scoring process, with its own deadline: a watchdog thread signals the
    process (SIGUSR1, so math-verify's own SIGALRM timers are untouched), which interrupts Python
    code and sleeps. A hang in C code is caught by the pool's overall budget instead."""
    global _ARMED
    signal.signal(signal.SIGUSR1, _on_deadline)
    timer = threading.Timer(timeout_s, lambda: _ARMED and os.kill(os.getpid(), signal.SIGUSR1))
    timer.daemon = True
    _ARMED = True
    timer.start()
    try:
        return verifier.score(response, ground_truth)
    except _Deadline:
        return RewardResult(verifier.failure_reward, f"verifier timed out after {timeout_s:g}s", status="timeout")
    finally:
        _ARMED = False
        timer.cancel()


class RewardWorkersError(RuntimeError):
    """The scoring processes cannot start or cannot load the verifier: every reward would fail."""


def main_script_without_guard() -> Optional[str]:
    """The path of the running main script if it has no `if __name__ == "__main__":` block (spawned
    worker processes re-import it and re-run its top level), else None (a guarded script, `-m`
    module, `-c`, an interactive session)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or getattr(main, "__spec__", None) is not None or not os.path.isfile(path):
        return None  # `python -m pkg.mod` (its own guard decides) or no file
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    for node in tree.body:
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test):
            return None
    return path


_NO_GUARD_HELP = ("reward.workers > 0 scores in spawned processes, which re-import the main script {path} and re-run "
                  "everything at its top level (building another Trainer). Put the code that runs under\n"
                  "    if __name__ == \"__main__\":\n"
                  "(Python's rule for multiprocessing with spawn), or set reward.workers=0 to score in this process.")


def _probe(blob: bytes) -> str:
    """Runs in a fresh scoring process: unpickles the verifier; '' or the error's traceback."""
    try:
        pickle.loads(blob)
        return ""
    except BaseException:  # noqa: BLE001 - reported to the trainer verbatim
        return traceback.format_exc(limit=4)


class RewardPool:
    """Scores responses in persistent worker processes (spawned once, reused every step).

    Each response has timeout_s: past it, its verifier is interrupted and the response gets
    failure_reward with status "timeout" while the others are scored normally. A hang that cannot
    be interrupted (C code) is caught by the batch budget (timeout_s × responses per worker + 5 s):
    the unfinished responses time out and the workers are killed and re-spawned on the next call.
    A worker that dies gives status "error". workers=0 scores in this process (exceptions are
    still contained, a hang is not)."""

    def __init__(self, verifier: Verifier, workers: int = 2, timeout_s: float = 30.0, start_timeout_s: float = 180.0):
        if workers < 0:
            raise ValueError(f"workers: must be ≥ 0, got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: must be positive, got {timeout_s}")
        if workers > 0:
            path = main_script_without_guard()
            if path:  # the workers would re-run the script: fail now, not with every reward an error
                raise RewardWorkersError("reward workers cannot start: " + _NO_GUARD_HELP.format(path=path))
        self.verifier, self.workers, self.timeout_s = verifier, workers, float(timeout_s)
        self.start_timeout_s = start_timeout_s
        self._pool: Optional[cf.ProcessPoolExecutor] = None

    def _executor(self) -> cf.ProcessPoolExecutor:
        """The worker pool, started and probed: every worker process must come up and load the
        verifier, or this raises RewardWorkersError quoting the first worker's error."""
        if self._pool is not None:
            return self._pool
        self._pool = cf.ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"),
                                            initializer=die_with_parent, initargs=(os.getpid(),))
        blob = pickle.dumps(self.verifier)
        futures = [self._pool.submit(_probe, blob) for _ in range(self.workers)]
        _, not_done = cf.wait(futures, timeout=self.start_timeout_s)
        for f in futures:
            if f in not_done:
                problem = f"a worker did not start within {self.start_timeout_s:g}s"
            elif f.exception() is not None:
                problem = f"a worker process died while starting ({type(f.exception()).__name__}: {f.exception()})"
            elif f.result():
                problem = "a worker could not load the verifier:\n" + f.result()
            else:
                continue
            self.close()  # (a main script without a guard was refused in __init__, before any spawn)
            raise RewardWorkersError(f"reward workers cannot start: {problem}")
        return self._pool

    def footprint(self) -> Optional[str]:
        """What the verifier's sandboxes can hold at once (one per worker), or None without sandboxes."""
        lim = self.verifier.limits
        if lim is None:
            return None
        n = max(self.workers, 1)
        return (f"reward: {n} worker{'s' if n > 1 else ''} × {lim.footprint_mb} MiB a sandbox ({lim.memory_mb} MiB "
                f"address space + {lim.disk_mb} MiB /sandbox) = {n * lim.footprint_mb} MiB at most at once")

    def start(self) -> None:
        """Starts and probes the worker processes now (RewardWorkersError if they cannot start)."""
        if self.workers > 0:
            self._executor()

    def score(self, responses: Sequence[str], ground_truths: Sequence[Any]) -> List[RewardResult]:
        if len(responses) != len(ground_truths):
            raise ValueError(f"ground_truths: {len(ground_truths)} for {len(responses)} responses")
        if self.workers == 0:
            return [self.verifier.score(r, g) for r, g in zip(responses, ground_truths)]
        if not responses:
            return []
        fail = self.verifier.failure_reward
        out: List[Optional[RewardResult]] = [None] * len(responses)
        pool = self._executor()
        futures = {pool.submit(_worker_score, self.verifier, r, g, self.timeout_s): i
                   for i, (r, g) in enumerate(zip(responses, ground_truths))}
        done, not_done = cf.wait(futures, timeout=self.timeout_s * math.ceil(len(responses) / self.workers) + 5.0)
        for f in done:
            try:
                out[futures[f]] = f.result()
            except Exception as exc:  # noqa: BLE001 - a dead worker process
                out[futures[f]] = RewardResult(fail, f"scoring process failed: {type(exc).__name__}", status="error")
        for f in not_done:
            out[futures[f]] = RewardResult(fail, f"verifier timed out after {self.timeout_s:g}s", status="timeout")
        if not_done or any(r.reason.startswith("scoring process failed") for r in out):
            self.close()  # a hung or dead worker must not outlive the batch
        return out

    def close(self) -> None:
        if self._pool is None:
            return
        procs = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.kill()
        self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def score_batch(verifier: Verifier, responses: Sequence[str], ground_truths: Sequence[Any], workers: int = 2,
                timeout_s: float = 30.0) -> List[RewardResult]:
    """One-off scoring in fresh worker processes (see RewardPool); workers ≤ 1 scores in this process."""
    pool = RewardPool(verifier, workers=workers if workers > 1 else 0, timeout_s=timeout_s)
    try:
        return pool.score(responses, ground_truths)
    finally:
        pool.close()


def start_reward_pool(verifier: Verifier, workers: int, timeout_s: float, leader: bool, group) -> Optional["RewardPool"]:
    """The scoring pool of an engine's first rank (`leader`), started now: a script without a main
    guard or an unloadable verifier stops the run at start, on every rank of `group`."""
    import torch.distributed as dist

    pool, problem = None, ""
    if leader:
        try:
            pool = RewardPool(verifier, workers, timeout_s)
            pool.start()
            if pool.footprint():
                print(pool.footprint(), flush=True)
        except RewardWorkersError as exc:
            problem = str(exc)
    problems = [None] * dist.get_world_size(group)
    dist.all_gather_object(problems, problem, group=group)
    if any(problems):
        if pool is not None:
            pool.close()
        raise RewardWorkersError(next(p for p in problems if p))
    return pool
