"""Environments: multi-turn tasks where the other side is not a tool but a world or a user
(`rollout.environment`), and how a user adds one.

An environment is a class; the rollout builds one instance per trajectory:

- `reset(row) -> str`: the first message, from the dataset row (the whole row: any field the
  environment needs, the hidden answer included). It is the prompt the model reads, rendered like a
  dataset prompt; it must depend on the row alone (every sample of a group starts from the same
  message, and the dataset renders it once when it loads).
- `step(model_turn) -> (reply, done, reward)`: the model's turn as text (up to and including its end
  of turn); the reply the model reads next (plain text, rendered as a user turn of the chat template
  or between the result tags), whether the episode is over, and this step's reward. The
  trajectory's reward is the sum of its steps' rewards; `correct(total)` says whether it counts as
  solved (dynamic sampling and the accuracy metrics), by default `total > 0`.

Every live trajectory's step runs in parallel (threads, `rollout.tool_workers` at once), each bounded
by `timeout_s` (None: `rollout.tool_timeout_s`). A step that raises or overruns ends its trajectory
with the failure reward and the status error / timeout (counted, and the run stops when a whole
batch fails, as for a verifier); it never stops the rollout. Without `done` the episode ends at
`rollout.max_turns` model turns (the last turn still gets its step: its reward counts), at the
response's token budget or at the context's end. Settings come from `rollout.environment_settings`
as keyword arguments of the constructor.

    # mypkg/envs.py                                       # the config
    class Maze(Environment):                              rollout:
        def __init__(self, size=5): ...                     environment: "mypkg.envs:Maze"
        def reset(self, row): ...; return "You are at…"     environment_settings: {size: 7}
        def step(self, turn): ...; return reply, done, r    max_turns: 8

The built-in environment: `guess` (data/guess.py), a number-guessing game with higher/lower replies.
The reward is the environment's (`reward.type=environment`, the default with an environment); any
other reward.type scores the model's last turn with that verifier against the row's answer instead.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
from typing import Any, Dict, List, Optional, Sequence, Tuple

BUILTIN = {"guess": "megatron_hapo.data.guess:Guess"}


class Environment:
    timeout_s: Optional[float] = None

    def __init__(self, **settings):
        if settings:
            raise TypeError(f"environment {type(self).__name__}: unknown settings {sorted(settings)}")

    def reset(self, row: Dict[str, Any]) -> str:
        raise NotImplementedError(f"environment {type(self).__name__} defines no reset(row)")

    def step(self, model_turn: str) -> Tuple[str, bool, float]:
        raise NotImplementedError(f"environment {type(self).__name__} defines no step(model_turn)")

    def correct(self, total_reward: float) -> bool:
        return total_reward > 0


def resolve(spec: str):
    """The Environment class `rollout.environment` names: a built-in name or `module:Class`."""
    from .tool_api import import_object

    cls = import_object(spec, BUILTIN, "rollout.environment", "environment")
    if not inspect.isclass(cls) or not issubclass(cls, Environment):
        raise ValueError(f"rollout.environment: {spec!r} is not a subclass of "
                         f"megatron_hapo.rollout.env_api.Environment")
    return cls


def make(spec: str, settings: Optional[dict] = None) -> Environment:
    """One instance of the environment `spec` with its settings (a bad setting named)."""
    cls = resolve(spec)
    try:
        return cls(**(settings or {}))
    except TypeError as exc:
        raise ValueError(f"rollout.environment_settings: {spec!r}: {exc}") from None


def first_message(env: Environment, row) -> str:
    """`env.reset(row)` checked: a non-empty string."""
    text = env.reset(row)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"environment {type(env).__name__}: reset(row) must return the first message as a non-empty "
                         f"string, got {text!r}")
    return text


@dataclasses.dataclass
class Episode:
    """One trajectory's environment: its instance, the reward so far, and how it ended."""

    env: Environment
    reward: float = 0.0
    done: bool = False
    status: str = "ok"  # ok | error | timeout
    reason: str = ""
    steps: int = 0


class Episodes:
    """The environments of a batch's trajectories: reset from their rows, stepped in parallel."""

    def __init__(self, spec: str, settings: Optional[dict], timeout_s: float, workers: int, failure_reward: float = 0.0):
        self.spec, self.settings, self.failure_reward = spec, dict(settings or {}), failure_reward
        self.cls = resolve(spec)
        self.timeout_s = self.cls.timeout_s or timeout_s
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="hapo-env")
        self.seconds = 0.0

    def start(self, rows: Sequence[dict]) -> List[Episode]:
        """A fresh instance per row, reset (a reset that raises ends that trajectory before it starts)."""
        out = []
        for row in rows:
            ep = Episode(make(self.spec, self.settings))
            try:
                first_message(ep.env, row)
            except Exception as exc:  # noqa: BLE001 - the user's environment: contained, counted
                self._fail(ep, "error", f"reset: {type(exc).__name__}: {exc}")
            out.append(ep)
        return out

    def step(self, episodes: Sequence[Episode], turns: Sequence[str]) -> List[Optional[str]]:
        """Steps each episode with its model turn, in parallel; returns the reply to append to each (None
        where the episode is over: done, failed or timed out)."""
        futures = [self.pool.submit(ep.env.step, turn) for ep, turn in zip(episodes, turns)]
        out = []
        for ep, fut in zip(episodes, futures):
            ep.steps += 1
            try:
                reply, done, reward = fut.result(timeout=self.timeout_s)
                reward = float(reward)
                if not isinstance(reply, str):
                    raise TypeError(f"step() must return (reply: str, done: bool, reward: float), got a "
                                    f"{type(reply).__name__} reply")
            except concurrent.futures.TimeoutError:
                fut.cancel()  # a thread cannot be killed: the episode is dropped, the thread finishes on its own
                self._fail(ep, "timeout", f"step timed out after {self.timeout_s:g} s")
                out.append(None)
                continue
            except Exception as exc:  # noqa: BLE001 - the user's environment: contained, counted
                self._fail(ep, "error", f"step: {type(exc).__name__}: {exc}")
                out.append(None)
                continue
            ep.reward += reward
            ep.done = bool(done)
            out.append(None if ep.done else reply)
        return out

    def _fail(self, ep: Episode, status: str, reason: str) -> None:
        ep.status, ep.reason, ep.done = status, f"environment {self.spec}: {reason}"[:500], True
        ep.reward = self.failure_reward

    def result(self, ep: Episode):
        """The episode as a reward (`rewards.RewardResult`)."""
        from ..rewards import RewardResult

        if ep.status != "ok":
            return RewardResult(self.failure_reward, ep.reason, False, ep.status)
        correct = bool(ep.env.correct(ep.reward))
        return RewardResult(ep.reward, f"environment: reward {ep.reward:g} after {ep.steps} steps", correct)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
