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


class SandboxedMath(MathVerifier):
    """math-verify on the response as echoed back by a program in the code sandbox (after a short
    sleep): scoring then keeps sandboxes running, for the kill and orphan tests. Without a usable
    sandbox it scores directly."""

    def __init__(self, *args, **kwargs):
        from megatron_hapo.rewards import SandboxLimits, sandbox_status

        super().__init__(*args, **kwargs)
        self.limits = SandboxLimits(wall_s=10.0) if sandbox_status()[0] else None

    def _score(self, response, ground_truth):
        from megatron_hapo.rewards import run_python

        if self.limits is not None:
            res = run_python("import sys, time\ntime.sleep(0.2)\nsys.stdout.write(sys.stdin.read())", response, self.limits)
            if not res.ok:
                raise RuntimeError(f"sandbox: {res.status} {res.stderr[-300:]}")
            response = res.stdout
        return super()._score(response, ground_truth)


class HasSeven(MathVerifier):
    """Correct when the response holds a 7: an untrained model gets mixed groups every step, so the
    schedule tests see real gradients without a warm-up."""

    def _score(self, response, ground_truth):
        from megatron_hapo.rewards import RewardResult

        hit = "7" in (response or "")
        return RewardResult(self.reward_correct if hit else self.reward_wrong, "7" if hit else "no 7", hit)
