"""Prints an installed distribution's requirements for this platform, minus some names.

Used by the Dockerfile to install vLLM on an NGC PyTorch image without letting pip replace the
image's own torch build (vLLM pins an exact torch release; NGC ships a pre-release build of it):

    pip install --no-deps vllm==X && python tools/requirements_of.py vllm --exclude torch ... | pip install -r /dev/stdin
"""
from __future__ import annotations

import argparse
import sys
from importlib.metadata import distribution

from packaging.requirements import Requirement


def requirements(dist_name: str, exclude: set[str]) -> list[str]:
    out = []
    for spec in distribution(dist_name).requires or []:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # another platform, or an optional extra
        if req.name.lower().replace("_", "-") in exclude:
            continue
        req.marker = None
        out.append(str(req))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dist")
    p.add_argument("--exclude", nargs="*", default=[])
    args = p.parse_args(argv)
    print("\n".join(requirements(args.dist, {e.lower().replace("_", "-") for e in args.exclude})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
