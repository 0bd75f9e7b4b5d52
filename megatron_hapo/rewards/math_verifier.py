"""Math answers: "Answer:" lines (DAPO-Math) or the last \\boxed{}, checked with math-verify."""
from __future__ import annotations

from typing import Optional

from .base import RewardResult, Verifier, extract_answer_line


def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (or \\fbox{...}), with nested braces."""
    for key in ("\\boxed{", "\\fbox{"):
        start = text.rfind(key)
        if start < 0:
            continue
        i, depth, begin = start + len(key), 1, start + len(key)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[begin:i - 1].strip()
    return None


def extract_math_answer(response: str) -> Optional[str]:
    return extract_answer_line(response) or last_boxed(response or "")


class MathVerifier(Verifier):
    """reward_correct / reward_wrong: ±1 (DAPO) or 1/0."""

    def __init__(self, reward_correct: float = 1.0, reward_wrong: float = -1.0, timeout_s: int = 5):
        self.reward_correct, self.reward_wrong = float(reward_correct), float(reward_wrong)
        self.failure_reward = self.reward_wrong
        self.timeout_s = timeout_s

    def _score(self, response: str, ground_truth) -> RewardResult:
        from math_verify import parse, verify

        answer = extract_math_answer(response)
        if answer is None:
            return RewardResult(self.reward_wrong, "no answer found ('Answer:' line or \\boxed{})")
        truth = str(ground_truth).strip()
        if answer.strip().rstrip(".") == truth:  # fast path
            return RewardResult(self.reward_correct, "exact match", True)
        gold = parse(f"${truth}$", parsing_timeout=self.timeout_s) or parse(truth, parsing_timeout=self.timeout_s)
        pred = parse(f"${answer}$", parsing_timeout=self.timeout_s) or parse(answer, parsing_timeout=self.timeout_s)
        if not gold:
            return RewardResult(self.reward_wrong, f"ground truth {truth!r} does not parse")
        if not pred:
            return RewardResult(self.reward_wrong, f"answer {answer!r} does not parse")
        if verify(gold, pred, timeout_seconds=self.timeout_s):
            return RewardResult(self.reward_correct, "equivalent (math-verify)", True)
        return RewardResult(self.reward_wrong, f"answer {answer!r} differs from {truth!r}")
