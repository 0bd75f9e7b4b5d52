"""Verifiers by name, for the config's `reward.type`: math | exact | reasoning_gym | code, or
"package.module:ClassName" for a user's own `Verifier` subclass (verl's custom reward function)."""
from __future__ import annotations

import importlib
from typing import Optional

from .base import Verifier

BUILTIN = ("math", "exact", "reasoning_gym", "code")


def build_verifier(kind: str, reward_correct: Optional[float] = None, reward_wrong: Optional[float] = None,
                   sandbox=None) -> Verifier:
    """`sandbox`: the code verifier's SandboxLimits (None: the defaults)."""
    scores = {k: v for k, v in (("reward_correct", reward_correct), ("reward_wrong", reward_wrong)) if v is not None}
    if kind == "math":
        from .math_verifier import MathVerifier

        return MathVerifier(**scores)
    if kind == "exact":
        from .logic import ExactMatchVerifier

        return ExactMatchVerifier(**scores)
    if kind == "reasoning_gym":
        from .logic import ReasoningGymVerifier

        return ReasoningGymVerifier(**scores)
    if kind == "code":
        from .code import CodeVerifier

        return CodeVerifier(**scores) if sandbox is None else CodeVerifier(sandbox, **scores)
    if ":" not in kind:
        raise ValueError(f"reward.type: unknown verifier {kind!r}; expected one of {list(BUILTIN)} or 'module:Class'")
    module, _, name = kind.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reward.type: cannot load {kind!r}: {type(exc).__name__}: {exc}") from exc
    try:
        verifier = cls(**scores)
    except TypeError as exc:
        raise ValueError(f"reward.type: {kind!r}: {exc}") from exc
    if not isinstance(verifier, Verifier):
        raise ValueError(f"reward.type: {kind!r} is not a megatron_hapo.rewards.Verifier subclass")
    return verifier
