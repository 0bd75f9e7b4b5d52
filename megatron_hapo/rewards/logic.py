"""Procedural and logic tasks from reasoning-gym (knights-and-knaves, arithmetic, countdown, ...),
scored by each generator's own checker; plain exact match (normalised) for other string answers."""
from __future__ import annotations

import re

from .base import RewardResult, Verifier, extract_answer_line, extract_tagged


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip().strip(".").lower()


def extract_logic_answer(response: str):
    return extract_tagged(response) or extract_answer_line(response)


class ReasoningGymVerifier(Verifier):
    """ground_truth: a reasoning-gym entry (dict with "answer" and "metadata.source_dataset"), or a plain
    string for exact match. Scores in [0, 1] from the checker map to reward_wrong..reward_correct."""

    def __init__(self, reward_correct: float = 1.0, reward_wrong: float = 0.0):
        self.reward_correct, self.reward_wrong = float(reward_correct), float(reward_wrong)
        self.failure_reward = self.reward_wrong

    def _score(self, response: str, ground_truth) -> RewardResult:
        answer = extract_logic_answer(response)
        if answer is None:
            return RewardResult(self.reward_wrong, "no answer found (<answer> tags or 'Answer:' line)")
        if isinstance(ground_truth, dict) and "metadata" in ground_truth:
            import reasoning_gym

            source = ground_truth["metadata"]["source_dataset"]
            s = float(reasoning_gym.get_score_answer_fn(source)(answer, ground_truth))
            reward = self.reward_wrong + s * (self.reward_correct - self.reward_wrong)
            return RewardResult(reward, f"{source} checker score {s:g}", s >= 1.0)
        if normalise(answer) == normalise(ground_truth):
            return RewardResult(self.reward_correct, "exact match", True)
        return RewardResult(self.reward_wrong, f"answer {answer!r} differs from {ground_truth!r}")


class ExactMatchVerifier(Verifier):
    """The whole response (or its <answer>/"Answer:" part when there is one), normalised, equals the
    ground truth: procedural tasks whose answer is the response itself (the built-in addition)."""

    def __init__(self, reward_correct: float = 1.0, reward_wrong: float = 0.0):
        self.reward_correct, self.reward_wrong = float(reward_correct), float(reward_wrong)
        self.failure_reward = self.reward_wrong

    def _score(self, response: str, ground_truth) -> RewardResult:
        answer = extract_logic_answer(response) or response
        if normalise(answer) == normalise(ground_truth):
            return RewardResult(self.reward_correct, "exact match", True)
        return RewardResult(self.reward_wrong, f"answer {answer[:80]!r} differs from {str(ground_truth)[:80]!r}")
