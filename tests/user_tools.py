"""A user's tools and environment, named in a test's config by import path (`tests.user_tools:Lookup`): one
tool class with settings, one decorated function, one environment (`tests.user_tools:Echo`)."""
import time

from megatron_hapo.rollout.env_api import Environment
from megatron_hapo.rollout.tool_api import Tool, tool


class Lookup(Tool):
    name = "lookup"
    description = "Looks a word up in the user's table."
    parameters = {"type": "object", "properties": {"word": {"type": "string"}, "upper": {"type": "boolean"}},
                  "required": ["word"]}

    def __init__(self, table=None):
        self.table = dict(table or {})

    def call(self, word, upper=False):
        if word == "boom":
            raise KeyError(word)
        if word == "slow":
            time.sleep(3)
        out = self.table.get(word, "not found")
        return out.upper() if upper else out


@tool(timeout_s=0.5)
def add(a: int, b: int = 0):
    """Adds two integers."""
    return a + b


class Echo(Environment):
    """A user's environment: replies with the turn reversed; "win" ends the episode with the row's reward,
    "boom" raises, "slow" sleeps past any timeout, "meet" waits for `meet` steps at once (a barrier: only
    steps run in parallel get through)."""

    def __init__(self, reward=1.0, meet=0):
        self.reward, self.barrier = float(reward), _barrier(meet)

    def reset(self, row):
        if row.get("bad"):
            raise ValueError("no such level")
        self.row, self.turns = row, []
        return f"Level {row['level']}: say win."

    def step(self, model_turn):
        self.turns.append(model_turn)
        if "boom" in model_turn:
            raise RuntimeError("the world broke")
        if "slow" in model_turn:
            time.sleep(3)
        if "meet" in model_turn:
            self.barrier.wait(timeout=2)
        if "win" in model_turn:
            return "", True, self.reward * self.row["level"]
        return model_turn[::-1], False, 0.0


_BARRIERS = {}


def _barrier(n):
    import threading

    if n and n not in _BARRIERS:
        _BARRIERS[n] = threading.Barrier(n)
    return _BARRIERS.get(n)
