"""Reward functions for the trainer tests, loaded by `reward.type=tests.verifiers:NAME`."""
import time

from megatron_hapo.rewards import MathVerifier


class HangOnGroundTruth(MathVerifier):
    """math-verify, except that a row whose answer is "hang" never returns (a broken reward function)."""

    def _score(self, response, ground_truth):
        if ground_truth == "hang":
            time.sleep(120)
        return super()._score(response, ground_truth)
