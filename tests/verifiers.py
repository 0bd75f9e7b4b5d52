"""Reward functions for the trainer tests, loaded by `reward.type=tests.verifiers:NAME`."""
import time

from megatron_hapo.rewards import MathVerifier


class HangOnGroundTruth(MathVerifier):
    """math-verify, except that a row whose answer is "hang" never returns (a broken reward function)."""

    def _score(self, response, ground_truth):
        if ground_truth == "hang":
            time.sleep(120)
        return super()._score(response, ground_truth)


class AlwaysRaises(MathVerifier):
    """A broken reward function: raises on every response."""

    def _score(self, response, ground_truth):
        raise ValueError("broken verifier: cannot parse the answer format")


class RaiseOnGroundTruth(MathVerifier):
    """math-verify, except that a row whose answer is "boom" raises (a verifier with a bug on some rows)."""

    def _score(self, response, ground_truth):
        if ground_truth == "boom":
            raise KeyError("boom")
        return super()._score(response, ground_truth)
