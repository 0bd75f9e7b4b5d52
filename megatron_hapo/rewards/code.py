"""Code: run the response's program against test cases in the sandbox.

ground_truth: {"inputs": [...], "outputs": [...]} for stdin/stdout programs, plus "fn_name" for
function-call tests (LiveCodeBench-style): each input is then a JSON list of arguments and the
output the expected return value (compared as JSON). All tests must pass for the reward.
"""
from __future__ import annotations

import json
import logging
import re

from .base import RewardResult, Verifier
from .sandbox import SandboxLimits, run_python, sandbox_status

log = logging.getLogger(__name__)
_FENCE = re.compile(r"```(?:python|py|Python)?\s*\n(.*?)```", re.S)

_HARNESS = '''
import json as _json, sys as _sys
_args = _json.loads(_sys.stdin.read())
_fn = globals().get({name!r})
if _fn is None and "Solution" in globals():
    _fn = getattr(Solution(), {name!r})
_sys.stdout.write(_json.dumps(_fn(*_args)))
'''


def extract_code(response: str):
    blocks = _FENCE.findall(response or "")
    return blocks[-1] if blocks else None


def _same_stdout(got: str, want: str) -> bool:
    norm = lambda s: "\n".join(line.rstrip() for line in s.strip().splitlines())  # noqa: E731
    return norm(got) == norm(want)


class CodeVerifier(Verifier):
    def __init__(self, limits: SandboxLimits = SandboxLimits(), reward_correct: float = 1.0, reward_wrong: float = 0.0,
                 allow_unsandboxed: bool = False, max_tests: int = 50):
        usable, why = sandbox_status()
        if not usable:
            if not allow_unsandboxed:
                raise RuntimeError(f"code verifier: {why}. Install bubblewrap, or pass allow_unsandboxed=True "
                                   "to run model-written code with rlimits only (not isolated).")
            log.warning("code verifier: %s; running UNSANDBOXED with rlimits only", why)
        self.sandboxed = usable
        self.limits, self.allow_unsandboxed, self.max_tests = limits, allow_unsandboxed, max_tests
        self.reward_correct, self.reward_wrong = float(reward_correct), float(reward_wrong)
        self.failure_reward = self.reward_wrong

    def _wrong(self, reason: str) -> RewardResult:
        return RewardResult(self.reward_wrong, reason if self.sandboxed else f"UNSANDBOXED: {reason}")

    def _score(self, response: str, ground_truth) -> RewardResult:
        code = extract_code(response)
        if code is None:
            return self._wrong("no ```python code block")
        tests = ground_truth if isinstance(ground_truth, dict) else json.loads(ground_truth)
        inputs, outputs = tests["inputs"][: self.max_tests], tests["outputs"][: self.max_tests]
        if len(inputs) != len(outputs) or not inputs:
            return self._wrong("ground truth: inputs and outputs differ in number or are empty")
        fn = tests.get("fn_name")
        program = code + (_HARNESS.format(name=fn) if fn else "")
        for i, (inp, want) in enumerate(zip(inputs, outputs)):
            stdin = json.dumps(inp if isinstance(inp, list) else json.loads(inp)) if fn else str(inp)
            res = run_python(program, stdin, self.limits, self.allow_unsandboxed)
            if not res.ok:
                tail = res.stderr.strip().splitlines()[-1:] or [""]
                return self._wrong(f"test {i}: {res.status} (exit {res.returncode}) {tail[0][:200]}")
            if fn:
                try:
                    got = json.loads(res.stdout)
                except ValueError:
                    return self._wrong(f"test {i}: output is not JSON: {res.stdout[:100]!r}")
                expected = want if not isinstance(want, str) else json.loads(want)
                if got != expected:
                    return self._wrong(f"test {i}: returned {str(got)[:100]}, expected {str(expected)[:100]}")
            elif not _same_stdout(res.stdout, str(want)):
                return self._wrong(f"test {i}: wrong output {res.stdout[:100]!r}")
        return RewardResult(self.reward_correct, f"passed {len(inputs)} tests", True)
