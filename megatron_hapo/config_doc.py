"""The configuration reference, generated from the typed config itself: every setting's type, default
and doc, where the doc is the field's own comment in the source (on its line, or the comment lines
right above it). `megatron-hapo config --doc` writes docs/CONFIG.md; a test checks that the file is
current and that no field lacks a doc, so the reference cannot go stale.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Dict, List

from . import config as C

HEADER = """# Configuration reference

Generated from `megatron_hapo/config.py` by `megatron-hapo config --doc` (do not edit by hand; a test
checks that this file is current). A run reads a YAML file (`--config`) with these sections, then
`section.key=value` overrides from the command line; every value is coerced to its type and checked
at load under its name, and the effective config is printed, saved as `run_dir/config.yaml` and
stored in checkpoints. The `algorithm` section starts from the preset named by `algorithm.name`
(`hapo`, `dapo`, `grpo`; docs/HAPO.md), then applies the overrides.
"""


def _comment(line: str) -> str:
    """The trailing `# comment` of a source line, outside string literals."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#":
            return line[i + 1:].strip()
    return ""


def field_docs(cls) -> Dict[str, str]:
    """{field: doc} of a dataclass and its dataclass bases: the comment on the field's line, else the
    comment block right above it (joined)."""
    docs: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        lines = inspect.getsource(klass).splitlines()
        above: List[str] = []
        for line in lines:
            stripped = line.strip()
            m = re.match(r"^    (\w+)\s*:", line)
            if stripped.startswith("#") and line.startswith("    ") and not line.startswith("     "):
                above.append(stripped.lstrip("#").strip())
                continue
            if m and m.group(1) in {f.name for f in dataclasses.fields(klass)}:
                docs[m.group(1)] = _comment(line) or " ".join(above)
            above = []
    return docs


def _type_name(tp) -> str:
    if isinstance(tp, str):
        return tp.replace("typing.", "")
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null" if len(args) == 1 else " | ".join(map(_type_name, args))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}" if typing.get_args(tp) else "list"
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _default(field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and value >= 2**20 and value % 2**20 == 0:
        return f"{value} ({value // 2**20} MiB)"
    return f"{value!r}" if isinstance(value, str) else str(value)


def sections():
    """(section name, dataclass) in the order of `Config`."""
    hints = typing.get_type_hints(C.Config)
    return [(name, hints[name]) for name in C.SECTIONS]


def undocumented() -> List[str]:
    """`section.field` names whose doc is empty."""
    out = []
    for name, cls in sections():
        docs = field_docs(cls)
        out += [f"{name}.{f.name}" for f in dataclasses.fields(cls) if not docs.get(f.name)]
    return out


def reference() -> str:
    parts = [HEADER]
    for name, cls in sections():
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        doc = inspect.getdoc(cls) or ""
        parts.append(f"## `{name}`\n")
        if doc and not doc.startswith(cls.__name__ + "("):
            parts.append(" ".join(doc.split()) + "\n")
        rows = ["| setting | type | default | what it does |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            text = docs.get(f.name, "").replace("|", "\\|")
            rows.append(f"| `{name}.{f.name}` | {_type_name(hints[f.name])} | `{_default(f)}` | {text} |")
        parts.append("\n".join(rows) + "\n")
    return "\n".join(parts)
