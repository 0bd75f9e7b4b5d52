#!/usr/bin/env bash
# The GPU self-test on a bare GPU machine, as one command: a single H200 with Python 3.12, torch 2.11
# (CUDA 13), Triton, CuPy and numpy, and no vLLM, Transformer Engine, megatron-core, transformers or
# psutil, no network, and minutes to spare.
#
#   tools/device_check.sh --fetch-wheels           # here, where the package index is reachable: fills .whl/
#   tools/device_check.sh [OUT_DIR] [extra tools/gpu_selftest.py arguments]     # there
#
# OUT_DIR defaults to $OUT when set (else ./gpu_check): gpu_selftest.json, gpu_selftest.txt (the table)
# and gpu_selftest.log land there, rewritten after every check (a timeout keeps what finished).
#
# The wheels that machine lacks travel in .whl/ (git-ignored): exactly the pinned set in
# tools/device_wheels.txt (megatron-core 0.16.1, transformers 5.19.0 and what they need that is not
# there: 28 wheels, about 30 MiB), which --fetch-wheels downloads for CPython 3.12 / manylinux x86_64 with
# --no-deps (no torch, no CUDA wheel), checking that .whl/ holds nothing else and stays under the
# 64 MiB a device call carries. psutil is not in the set: the stack runs without it (training/lib_shims).
# vLLM's and TE's wheels (326 and 277 MB) cannot travel: their checks say "skipped: not installed".
#
# The self-test runs every check whose libraries import, with the local layer spec unless TE is there,
# under a budget of $BUDGET seconds (default 360): the checks not started by then are reported as
# skipped, most important first. Exit status: the self-test's (1 if a check failed), or 2 when the
# stack cannot even import (the message names the missing module).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"
whl="${WHEELS:-.whl}"  # the carried wheels' folder (tests point it elsewhere)
LIMIT_MIB=64

if [ "${1:-}" = "--fetch-wheels" ]; then
  pins=$(grep -v '^\s*#' tools/device_wheels.txt | grep -v '^\s*$')
  mkdir -p "$whl"
  rm -f "$whl"/*.whl
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$whl" $pins || { echo "device_check: pip download of tools/device_wheels.txt failed"; exit 2; }
  want=$(echo "$pins" | wc -l)
  got=$(find "$whl" -maxdepth 1 -type f -name '*.whl' | wc -l)
  if [ "$got" -ne "$want" ]; then
    echo "device_check: $whl/ holds $got wheels, tools/device_wheels.txt pins $want"; exit 2
  fi
  if find "$whl" -maxdepth 1 -type f \( -iname 'torch-*' -o -iname 'nvidia_*' \) | grep -q .; then
    echo "device_check: a torch or CUDA wheel landed in $whl/; that machine has its own"; exit 2
  fi
  mib=$(( ($(du -cb "$whl"/*.whl | tail -n 1 | cut -f1) + 1048575) / 1048576 ))
  tree=$(( ($(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1) + 1048575) / 1048576 ))
  if [ $((mib + tree)) -gt "$LIMIT_MIB" ]; then
    echo "device_check: $whl/ is $mib MiB and the tree $tree MiB: over the $LIMIT_MIB MiB a device call carries"; exit 2
  fi
  echo "device_check: $whl/ holds the $got pinned wheels, $mib MiB (with the tree: $((mib + tree)) of $LIMIT_MIB MiB)"
  exit 0
fi

out="${1:-${OUT:-gpu_check}}"
[ $# -gt 0 ] && shift
mkdir -p "$out"
budget="${BUDGET:-360}"
export PYTHONUNBUFFERED=1
if compgen -G "$whl/*.whl" >/dev/null; then
  site="${TMPDIR:-/tmp}/megatron-hapo-site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$whl"/*.whl || {
    echo "device_check: installing the carried wheels in $whl/ failed" | tee "$out/gpu_selftest.log"; exit 2; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# everything the self-test imports (its REQUIRED_IMPORTS), so a missing wheel is named before any check runs
if ! "$PY" tools/gpu_selftest.py --check-imports >"$out/import_error.txt" 2>&1; then
  missing=$(grep -m 1 "^missing module" "$out/import_error.txt" || tail -n 1 "$out/import_error.txt")
  echo "device_check: the stack does not import: $missing; carry the wheels of tools/device_wheels.txt in .whl/" \
       "(run tools/device_check.sh --fetch-wheels where the package index is reachable)" | tee "$out/gpu_selftest.log"
  exit 2
fi
timeout $((${budget%.*} + 180)) "$PY" tools/gpu_selftest.py --budget "$budget" --out "$out/gpu_selftest.json" \
  --table "$out/gpu_selftest.txt" "$@" 2>&1 | tee "$out/gpu_selftest.log"
exit "${PIPESTATUS[0]}"
