"""The built-in tools (`rollout.tools=[python, calculator, search]`); how to write one: tool_api.py.

- `python`: the model's program, run in the code sandbox (pooled: a fresh child of a fork server per
  call); the result is what it prints.
- `calculator`: an arithmetic expression, evaluated in this process from its syntax tree (numbers,
  + - * / // % **, parentheses, a few math functions): no name lookup, no attribute, no call of
  anything else, operand sizes bounded (a `9**9**9` is an error, not a frozen trainer).
- `search`: BM25 over a local corpus the config names (`rollout.tool_settings.search.path`: a JSONL
  file of {"text", optional "title"} rows, or a text file of blank-line-separated passages), indexed
  once with `bm25s`; the result is the top_k passages, each cut to max_chars.
"""
from __future__ import annotations

import ast
import json
import math
import operator
import os
from typing import List

from .tool_api import Tool


class Python(Tool):
    name = "python"
    description = "Runs a Python program and returns what it prints (stdout)."
    parameters = {"type": "object", "properties": {"code": {"type": "string", "description": "the program"}},
                  "required": ["code"]}
    sandboxed = True

    def program(self, code: str) -> str:
        if not code.strip():
            raise ValueError("empty program")
        return code


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "exp": math.exp, "log": math.log, "sin": math.sin, "cos": math.cos, "tan": math.tan,
              "abs": abs, "round": round, "min": min, "max": max, "floor": math.floor, "ceil": math.ceil}
_CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_BITS = 4096  # an integer operand or result larger than this is refused (the host process does the work)


class Calculator(Tool):
    name = "calculator"
    description = "Evaluates an arithmetic expression (+ - * / // % **, parentheses, sqrt, exp, log, sin, cos, abs, round, min, max)."
    parameters = {"type": "object", "properties": {"expression": {"type": "string", "description": "e.g. 123*4567"}},
                  "required": ["expression"]}
    timeout_s = 1.0

    def call(self, expression: str) -> str:
        if len(expression) > 1000:
            raise ValueError("expression longer than 1000 characters")
        try:
            tree = ast.parse(expression.strip(), mode="eval")
        except SyntaxError as exc:
            raise ValueError(f"not an expression ({exc.msg})") from None
        value = self._eval(tree.body)
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)
        return str(value)

    def _eval(self, node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return self._bounded(node.value)
        if isinstance(node, ast.Name) and node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](self._eval(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = self._eval(node.left), self._eval(node.right)
            if isinstance(node.op, ast.Pow) and isinstance(left, int) and isinstance(right, int) and \
                    right > 0 and left not in (0, 1, -1) and right * max(1, abs(left).bit_length()) > MAX_BITS:
                raise ValueError(f"result too large (more than {MAX_BITS} bits)")
            return self._bounded(_BINARY[type(node.op)](left, right))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS and not node.keywords:
            return self._bounded(_FUNCTIONS[node.func.id](*(self._eval(a) for a in node.args)))
        raise ValueError(f"unsupported syntax: {ast.unparse(node)[:60]!r}")

    @staticmethod
    def _bounded(value):
        if isinstance(value, int) and value.bit_length() > MAX_BITS:
            raise ValueError(f"result too large (more than {MAX_BITS} bits)")
        return value


class Search(Tool):
    name = "search"
    description = "Searches the reference documents and returns the most relevant passages."
    parameters = {"type": "object", "properties": {"query": {"type": "string", "description": "what to look for"}},
                  "required": ["query"]}
    timeout_s = 5.0

    def __init__(self, path: str = "", top_k: int = 3, max_chars: int = 400):
        import bm25s

        if not path:
            raise TypeError("needs path: the corpus (rollout.tool_settings.search.path: a .jsonl of {\"text\"} rows or a text file)")
        if not os.path.exists(path):
            raise TypeError(f"path: no such file {path!r}")
        self.docs = self._load(path)
        if not self.docs:
            raise TypeError(f"path: {path!r} holds no passages")
        self.top_k, self.max_chars = max(1, int(top_k)), max(20, int(max_chars))
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize([d for d in self.docs], stopwords="en", show_progress=False), show_progress=False)

    @staticmethod
    def _load(path: str) -> List[str]:
        with open(path, encoding="utf-8", errors="replace") as f:
            if not path.endswith(".jsonl"):
                return [p.strip() for p in f.read().split("\n\n") if p.strip()]
            docs = []
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    text = (f"{row['title']}: " if row.get("title") else "") + str(row["text"])
                except (ValueError, KeyError, TypeError, AttributeError):
                    raise TypeError(f"path: {os.path.basename(path)}:{n} is not a {{\"text\": ...}} row") from None
                docs.append(text)
            return docs

    def call(self, query: str) -> str:
        import bm25s

        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not tokens.vocab:
            return "no results"
        k = min(self.top_k, len(self.docs))
        ids, scores = self.index.retrieve(tokens, k=k, show_progress=False)
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if s > 0]
        if not hits:
            return "no results"
        return "\n".join(f"[{r + 1}] {self._cut(self.docs[i])}" for r, (i, _) in enumerate(hits))

    def _cut(self, text: str) -> str:
        return text if len(text) <= self.max_chars else text[:self.max_chars].rstrip() + "…"
