"""One interface for every verifier: `score(response, ground_truth) -> RewardResult`.

A verifier never raises into the trainer: `safe_score` and `score_batch` turn any exception or
time-out into a reward of `failure_reward` with the reason, and count it.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing as mp
import re
from typing import Any, List, Optional, Sequence


@dataclasses.dataclass(frozen=True)
class RewardResult:
    score: float
    reason: str
    correct: bool = False


class Verifier:
    """Subclasses implement `_score`; `score` contains its failures."""

    failure_reward: float = 0.0

    def _score(self, response: str, ground_truth: Any) -> RewardResult:
        raise NotImplementedError

    def score(self, response: str, ground_truth: Any) -> RewardResult:
        try:
            result = self._score(response, ground_truth)
            if not isinstance(result, RewardResult):
                raise TypeError(f"verifier returned {type(result).__name__}, not RewardResult")
            return result
        except Exception as exc:  # noqa: BLE001 - contained by design
            return RewardResult(self.failure_reward, f"verifier error: {type(exc).__name__}: {exc}"[:500])


_ANSWER_LINE = re.compile(r"(?i)answer\**\s*[:：]\s*([^\n]+)")  # DAPO-Math's extraction


def extract_answer_line(text: str) -> Optional[str]:
    """The last "Answer: ..." line (DAPO-Math's format), or None."""
    found = _ANSWER_LINE.findall(text or "")
    return found[-1].strip() if found else None


def extract_tagged(text: str, tag: str = "answer") -> Optional[str]:
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", text or "", flags=re.S | re.I)
    return found[-1].strip() if found else None


def _worker_score(verifier, response, ground_truth):
    return verifier.score(response, ground_truth)


def score_batch(verifier: Verifier, responses: Sequence[str], ground_truths: Sequence[Any], workers: int = 2,
                timeout_s: float = 30.0) -> List[RewardResult]:
    """Scores in parallel processes; a verifier that hangs past timeout_s gets failure_reward."""
    if len(responses) != len(ground_truths):
        raise ValueError(f"ground_truths: {len(ground_truths)} for {len(responses)} responses")
    if workers <= 1:
        return [verifier.score(r, g) for r, g in zip(responses, ground_truths)]
    out: List[Optional[RewardResult]] = [None] * len(responses)
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
    try:
        futures = {pool.submit(_worker_score, verifier, r, g): i for i, (r, g) in enumerate(zip(responses, ground_truths))}
        done, not_done = cf.wait(futures, timeout=timeout_s * max(1, len(responses) / workers))
        for f in done:
            i = futures[f]
            try:
                out[i] = f.result()
            except Exception as exc:  # noqa: BLE001 - a dead worker process
                out[i] = RewardResult(verifier.failure_reward, f"scoring process failed: {type(exc).__name__}")
        for f in not_done:
            out[futures[f]] = RewardResult(verifier.failure_reward, f"verifier timed out after {timeout_s:.0f}s")
    finally:
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:  # a hung verifier must not outlive the batch
            if p.is_alive():
                p.kill()
    return out
