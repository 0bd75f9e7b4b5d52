"""Verifiers with one interface, `score(response, ground_truth) -> RewardResult(score, reason)`:
math (math-verify), logic/procedural (reasoning-gym checkers), code (bubblewrap sandbox).
`score_batch` runs them in parallel processes; nothing ever raises into the trainer."""
from .base import RewardPool, RewardResult, RewardWorkersError, Verifier, score_batch, start_reward_pool
from .code import CodeVerifier
from .logic import ExactMatchVerifier, ReasoningGymVerifier
from .math_verifier import MathVerifier
from .registry import build_verifier
from .sandbox import SandboxLimits, run_python, sandbox_status

__all__ = ["CodeVerifier", "ExactMatchVerifier", "MathVerifier", "ReasoningGymVerifier", "RewardPool", "RewardResult", "RewardWorkersError", "start_reward_pool",
           "build_verifier", "SandboxLimits", "Verifier",
           "run_python", "sandbox_status", "score_batch"]
