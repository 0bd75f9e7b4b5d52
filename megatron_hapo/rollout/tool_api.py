"""The tools a model may call in a rollout (`rollout.tools`), and how a user adds one.

A tool is a class: a `name`, a `description` and a JSON schema of its arguments (`parameters`),
rendered into the chat template's tool list, and either

- `call(**arguments) -> str`, run in the trainer's process (`sandboxed = False`: a calculator, a
  search over a local index, a database the user trusts), or
- `program(**arguments) -> str`, Python source run in the code sandbox (`sandboxed = True`: the
  model's own code; the result is what the program prints);

each within its `timeout_s` (None: `rollout.tool_timeout_s`). What it returns is the result the model
reads, as plain text; an exception it raises becomes the result's error line, as a failed program's
does. Settings come from the config (`rollout.tool_settings.<name>`) as keyword arguments of the
constructor. A plain function becomes a host tool with `@tool` (its signature is the schema).

    # mypkg/tools.py                                  # the config
    class Search(Tool):                               rollout:
        name = "search"                                 tools: [python, "mypkg.tools:Search"]
        description = "Searches the manual."            tool_settings:
        parameters = {"type": "object",                   search: {path: /data/manual.jsonl}
            "properties": {"query": {"type": "string"}},
            "required": ["query"]}
        def __init__(self, path): ...
        def call(self, query): return ...

The built-in tools: `python` (sandboxed), `calculator` and `search` (rollout/builtin_tools.py).
"""
from __future__ import annotations

import concurrent.futures
import importlib
import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

BUILTIN = {"python": "megatron_hapo.rollout.builtin_tools:Python",
           "calculator": "megatron_hapo.rollout.builtin_tools:Calculator",
           "search": "megatron_hapo.rollout.builtin_tools:Search"}
JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict}


class Tool:
    name: str = ""
    description: str = ""
    parameters: Dict[str, Any] = {"type": "object", "properties": {}, "required": []}
    sandboxed: bool = False
    timeout_s: Optional[float] = None

    def __init__(self, **settings):
        if settings:
            raise TypeError(f"tool {self.name!r}: unknown settings {sorted(settings)}")

    @classmethod
    def schema(cls) -> dict:
        return {"type": "function", "function": {"name": cls.name, "description": cls.description,
                                                 "parameters": cls.parameters}}

    def call(self, **arguments) -> str:
        raise NotImplementedError(f"tool {self.name!r} defines neither call() (a host tool) nor program() (sandboxed)")

    def program(self, **arguments) -> str:
        raise NotImplementedError(f"tool {self.name!r} is sandboxed but defines no program()")

    def close(self) -> None:
        pass


def tool(fn: Optional[Callable] = None, *, name: Optional[str] = None, description: Optional[str] = None,
         parameters: Optional[dict] = None, timeout_s: Optional[float] = None):
    """A host tool from a function: its name, its docstring's first line, its signature as the schema
    (str/int/float/bool/list/dict annotations; parameters without a default are required)."""
    def wrap(f: Callable):
        sig = inspect.signature(f)
        types = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
        props, required = {}, []
        for p in sig.parameters.values():
            props[p.name] = {"type": types.get(p.annotation, "string")} if p.annotation is not inspect.Parameter.empty else {}
            if p.default is inspect.Parameter.empty:
                required.append(p.name)
        schema = parameters or {"type": "object", "properties": props, "required": required}
        doc = (inspect.getdoc(f) or "").strip().splitlines()

        def call(self, **arguments):
            return f(**arguments)

        return type(f.__name__, (Tool,), {"name": name or f.__name__, "description": description or (doc[0] if doc else ""),
                                          "parameters": schema, "timeout_s": timeout_s, "call": call,
                                          "__module__": f.__module__, "__doc__": f.__doc__})
    return wrap(fn) if fn is not None else wrap


def import_object(spec: str, builtin: Dict[str, str], setting: str, kind: str):
    """What a config entry names: one of `builtin`'s names or an import path `module:Attribute` (or
    `module.Attribute`); a bad one is a ValueError that names `setting`."""
    path = builtin.get(spec, spec)
    module, sep, attr = path.partition(":")
    if not sep:
        module, _, attr = path.rpartition(".")
    if not module or not attr:
        raise ValueError(f"{setting}: {spec!r} is neither a built-in {kind} {sorted(builtin)} nor an import path "
                         f"'module:Class'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{setting}: cannot import {spec!r} ({type(exc).__name__}: {exc})") from None


def resolve(spec: str):
    """The Tool class (or instance) a `rollout.tools` entry names: a built-in name or `module:Attribute`."""
    obj = import_object(spec, BUILTIN, "rollout.tools", "tool")
    cls = obj if inspect.isclass(obj) else type(obj)
    if not issubclass(cls, Tool) or not getattr(obj, "name", ""):
        raise ValueError(f"rollout.tools: {spec!r} is not a megatron_hapo Tool with a name (subclass "
                         f"megatron_hapo.rollout.tool_api.Tool, or decorate a function with @tool)")
    return obj


def schemas(specs: Sequence[str]) -> List[dict]:
    """The chat template's tool list for `rollout.tools`, in order (names checked unique)."""
    out, names = [], []
    for spec in specs:
        obj = resolve(spec)
        if obj.name in names:
            raise ValueError(f"rollout.tools: two tools named {obj.name!r}")
        names.append(obj.name)
        out.append(obj.schema())
    return out


def check_arguments(parameters: dict, arguments: Any) -> Optional[str]:
    """What is wrong with a call's arguments against the tool's schema (the part of JSON schema a tool's
    parameters use: an object, required keys, the types of its properties), or None."""
    if not isinstance(arguments, dict):
        return f"arguments must be a JSON object, got {type(arguments).__name__}"
    props = parameters.get("properties", {})
    missing = [k for k in parameters.get("required", []) if k not in arguments]
    if missing:
        return f"missing argument{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    extra = sorted(set(arguments) - set(props))
    if extra and parameters.get("additionalProperties", False) is False:
        return f"unknown argument{'s' if len(extra) > 1 else ''} {', '.join(extra)}; expected {sorted(props)}"
    for k, v in arguments.items():
        want = props.get(k, {}).get("type")
        py = JSON_TYPES.get(want)
        if py is not None and (not isinstance(v, py) or (want in ("integer", "number") and isinstance(v, bool))):
            return f"argument {k} must be {want}, got {type(v).__name__}"
    return None


class ToolBox:
    """The run's tools, built from the config, and the calls of a round run in parallel (`workers` at
    a time): sandboxed ones in a pool of long-lived sandboxes (rewards/sandbox_pool.py), host ones in
    threads. A call never raises: an unknown tool, bad arguments, an exception, a timeout all become a
    result with an error."""

    def __init__(self, specs: Sequence[str], settings: Dict[str, dict], limits, timeout_s: float, workers: int):
        import dataclasses

        from ..rewards.sandbox import sandbox_status

        self.tools: Dict[str, Tool] = {}
        for spec in specs:
            obj = resolve(spec)
            kwargs = dict(settings.get(obj.name, {}))
            try:
                inst = obj(**kwargs) if inspect.isclass(obj) else obj
            except TypeError as exc:
                raise ValueError(f"rollout.tool_settings.{obj.name}: {exc}") from None
            if not inspect.isclass(obj) and kwargs:
                raise ValueError(f"rollout.tool_settings.{obj.name}: {spec!r} is an instance, it takes no settings")
            self.tools[inst.name] = inst
        self.timeout_s = timeout_s
        self.sandboxes = None
        if any(t.sandboxed for t in self.tools.values()):
            usable, why = sandbox_status()
            if not usable:
                raise RuntimeError(f"rollout.tools: the code sandbox is unavailable ({why}); sandboxed tools run untrusted "
                                   "model output and never run outside it")
            from ..rewards.sandbox_pool import SandboxPool

            self.limits = dataclasses.replace(limits, wall_s=timeout_s, cpu_s=max(1, min(limits.cpu_s, int(timeout_s + 1))))
            self.sandboxes = SandboxPool(self.limits, workers)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tool")
        self.host = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="host-tool")

    def schemas(self) -> List[dict]:
        return [t.schema() for t in self.tools.values()]

    def submit(self, calls: Sequence[Tuple[str, Any]]) -> List[concurrent.futures.Future]:
        """Each (name, arguments) started; each future's result is a ToolResult."""
        return [self.pool.submit(self._one, name, args) for name, args in calls]

    def run(self, calls: Sequence[Tuple[str, Any]]):
        return [f.result() for f in self.submit(calls)]

    def _one(self, name: str, arguments: Any):
        from .tools import ToolResult

        t = self.tools.get(name)
        if t is None:
            return ToolResult("", "malformed", f"unknown tool {name!r}; available: {', '.join(self.tools)}")
        wrong = check_arguments(t.parameters, arguments)
        if wrong:
            return ToolResult("", "malformed", f"{name}: {wrong}")
        timeout = t.timeout_s or self.timeout_s
        if t.sandboxed:
            try:
                source = t.program(**arguments)
            except Exception as exc:  # noqa: BLE001 - the tool's own failure is the model's result
                return ToolResult("", "error", f"{type(exc).__name__}: {exc}")
            return sandbox_result(self.sandboxes.run(source, wall_s=timeout), timeout)
        future = self.host.submit(t.call, **arguments)
        try:
            out = future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            return ToolResult("", "timeout", f"timed out after {timeout:g} s")  # the thread finishes on its own
        except Exception as exc:  # noqa: BLE001
            return ToolResult("", "error", f"{type(exc).__name__}: {exc}")
        return ToolResult(str(out).rstrip(), "ok")

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.host.shutdown(wait=False, cancel_futures=True)
        if self.sandboxes is not None:
            self.sandboxes.close()
        for t in self.tools.values():
            t.close()


def sandbox_result(res, timeout_s: float):
    """A sandboxed program's RunResult as the model's result: what it printed, and the error if any
    (a timeout's partial output left out: how much there is depends on the machine's speed)."""
    from .tools import ToolResult

    if res.status == "ok":
        return ToolResult(res.stdout.rstrip(), "ok")
    if res.status == "timeout":
        return ToolResult("", "timeout", f"timed out after {timeout_s:g} s")
    last = next((line for line in reversed(res.stderr.strip().splitlines()) if line.strip()), "")
    reason = {"output_limit": "output limit reached", "disk_limit": "disk limit reached", "memory": "out of memory",
              "killed": "killed", "unavailable": "sandbox unavailable"}.get(res.status, last or f"exit code {res.returncode}")
    return ToolResult(res.stdout.rstrip(), "error", reason)
