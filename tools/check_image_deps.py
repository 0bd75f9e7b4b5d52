"""Resolves the GPU image's package set without building it: pip's resolver for the Dockerfile's
pins and setup.py's `gpu` and `test` extras, for the image's platform (manylinux x86_64, CPython
3.12), wheels only, nothing installed (`pip install --dry-run --report`).

    python tools/check_image_deps.py

Fails (exit 1, naming it) on a conflict or a missing wheel, when the resolved torch is not the one the
Dockerfile pins (vLLM's own pin would move it), when TE_VERSION lies outside the range megatron-core
declares for Transformer Engine, or when the TE PyTorch extension has no source release of that
version (the image compiles it against torch). A dependency with only a source release (the image
builds it) is listed, and what needs it is resolved through its other dependencies.
It needs only the package index; CI runs it before the suite (.ci/run).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(17, 40)] + ["manylinux2014_x86_64", "linux_x86_64"]  # Ubuntu 24.04: glibc 2.39


def dockerfile_pins(path: str = os.path.join(ROOT, "Dockerfile")) -> dict:
    """The Dockerfile's ARG NAME=VALUE defaults."""
    with open(path) as f:
        return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", f.read(), re.M))


def setup_extras(path: str = os.path.join(ROOT, "setup.py")) -> dict:
    """setup.py's module-level lists of requirements (CPU, GPU, TEST), read without running it."""
    with open(path) as f:
        tree = ast.parse(f.read())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                out[node.targets[0].id] = value
    return out


def image_requirements(pins: dict, extras: dict) -> list:
    te = pins["TE_VERSION"]
    reqs = [f"torch=={pins['TORCH_VERSION']}", f"vllm=={pins['VLLM_VERSION']}", f"megatron-core=={pins['MCORE_VERSION']}",
            f"transformer-engine=={te}", f"transformer-engine-cu13=={te}"]
    named = {name_of(r) for r in reqs}
    for r in extras["GPU"] + extras["TEST"]:
        if name_of(r) not in named:
            reqs.append(r)
    return reqs


def version_tuple(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else 0 for x in re.findall(r"\d+|[a-z]+", v.split("+")[0])[:3])


def te_range_problem(te: str, mcore_requires: list) -> str:
    """'' when TE `te` lies inside megatron-core's declared Transformer Engine range (any extra)."""
    for req in mcore_requires:
        m = re.match(r"transformer[-_]engine(\[[^\]]*\])?\s*(.*?)\s*(;|$)", req)
        if not m or not m.group(2):
            continue
        for clause in m.group(2).split(","):
            op, bound = re.match(r"\s*(<=|>=|<|>|==|!=)\s*(\S+)", clause).groups()
            a, b = version_tuple(te), version_tuple(bound)
            ok = {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b, "!=": a != b}[op]
            if not ok:
                return f"TE_VERSION={te} is outside megatron-core's declared range ({m.group(2)})"
    return ""


def pip(*args, **kw):
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, **kw)


def name_of(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), 1)[0].lower().replace("_", "-")


class Resolver:
    """pip's dry-run install for the image's interpreter and platform, wheels only."""

    def __init__(self, python_version: str):
        abi = "cp" + python_version.replace(".", "")
        self.args = ["install", "--dry-run", "--quiet", "--ignore-installed", "--only-binary=:all:", "--python-version",
                     python_version, "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none"]
        for plat in PLATFORMS:
            self.args += ["--platform", plat]

    def run(self, reqs, report, no_deps=False):
        return pip(*self.args, *(["--no-deps"] if no_deps else []), "--report", report, *reqs, timeout=1200)

    def metadata(self, req: str, folder: str):
        """The distribution one requirement resolves to on its own (no dependencies), or None."""
        report = os.path.join(folder, f"{name_of(req)}.json")
        if self.run([req], report, no_deps=True).returncode:
            return None
        with open(report) as f:
            return json.load(f)["install"][0]["metadata"]


def culprits(pip_output: str) -> list:
    """The packages pip names as unresolvable: 'Cannot install X==…' and '… (from X)'."""
    found = re.findall(r"Cannot install ([A-Za-z0-9_.\-]+)==", pip_output) + re.findall(r"\(from ([A-Za-z0-9_.\-]+)", pip_output)
    return list(dict.fromkeys(n.lower().replace("_", "-") for n in found))


def resolve(resolver: Resolver, reqs: list, folder: str):
    """Resolves `reqs`; a package that pip cannot install from wheels because a dependency of its has
    only a source release (the image builds those, pure Python or small C: it has a compiler) is
    expanded: itself checked alone, its dependencies that have wheels resolved with the rest, the
    source-only ones listed. Returns (installed metadata by name or None, source-only, pip's errors)."""
    source_only, expanded = {}, set()
    report = os.path.join(folder, "report.json")
    for _ in range(6):
        res = resolver.run(reqs, report)
        if res.returncode == 0:
            with open(report) as f:
                installed = {name_of(i["metadata"]["name"]): i["metadata"] for i in json.load(f)["install"]}
            return installed, source_only, ""
        output = res.stderr + res.stdout
        todo = [n for n in culprits(output) if n not in expanded and any(name_of(r) == n for r in reqs)]
        if not todo:
            return None, source_only, " | ".join(x for x in output.splitlines() if x.startswith("ERROR"))[:1500]
        for parent in todo:
            req = next(r for r in reqs if name_of(r) == parent)
            meta = resolver.metadata(req, folder)
            if meta is None:
                return None, source_only, f"{req}: no wheel for the image's platform"
            deps = [d.split(";")[0].strip() for d in meta.get("requires_dist", []) if "extra ==" not in d]
            kept = []
            for dep in deps:
                if resolver.metadata(dep, folder) is None:
                    source_only[dep] = parent
                else:
                    kept.append(dep)
            expanded.add(parent)
            reqs = [r for r in reqs if name_of(r) != parent] + kept
    return None, source_only, "gave up after 6 rounds of expansion"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--python-version", default="3.12")
    a = p.parse_args(argv)
    pins, extras = dockerfile_pins(), setup_extras()
    reqs = image_requirements(pins, extras)
    print(f"resolving the image's {len(reqs)} requirements for CPython {a.python_version}, manylinux x86_64, wheels only:")
    print("  " + " ".join(reqs))
    problems = []
    with tempfile.TemporaryDirectory(prefix="image-deps-") as folder:
        installed, source_only, error = resolve(Resolver(a.python_version), reqs, folder)
    if installed is None:
        problems.append(f"pip's resolver: {error}")
    else:
        torch_v = installed["torch"]["version"]
        if torch_v != pins["TORCH_VERSION"]:
            problems.append(f"torch resolves to {torch_v}, the Dockerfile pins {pins['TORCH_VERSION']}")
        problem = te_range_problem(pins["TE_VERSION"], installed["megatron-core"].get("requires_dist", []))
        if problem:
            problems.append(problem)
        print(f"resolved {len(installed)} distributions: " + ", ".join(
            f"{n} {installed[n]['version']}" for n in ("torch", "vllm", "megatron-core", "transformer-engine-cu13", "transformers")
            if n in installed))
    for dep, parent in source_only.items():
        print(f"  source release only, built in the image: {dep} (for {parent})")
    idx = pip("index", "versions", "transformer-engine-torch", timeout=300)
    if pins["TE_VERSION"] not in re.split(r"[\s,()]+", idx.stdout):
        problems.append(f"transformer-engine-torch {pins['TE_VERSION']} (the extension the image compiles) is not on the index")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print("image dependencies: " + ("FAILED" if problems else "ok"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
