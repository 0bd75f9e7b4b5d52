"""A user's tools, named in a test's config by import path (`tests.user_tools:Lookup`): one class with
settings, one decorated function."""
import time

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
