#!/usr/bin/env bash
# The GPU self-test on a bare GPU machine, as one command: a single H200 with Python 3.12, torch 2.11
# (CUDA 13), Triton and no vLLM, Transformer Engine or megatron-core, no network, and minutes to spare.
#
#   tools/device_check.sh [OUT_DIR] [extra tools/gpu_selftest.py arguments]
#
# OUT_DIR defaults to $OUT when set (else ./gpu_check): gpu_selftest.json, gpu_selftest.txt (the table)
# and gpu_selftest.log land there. Wheels the machine lacks travel in .whl/ (git-ignored); fill it here,
# on a machine that reaches the package index, with exactly:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl megatron-core==0.16.1
#
# (2.6 MB; its other needs, numpy and packaging, are on that machine. vLLM's and TE's wheels, 326 and
# 277 MB, cannot travel: their checks say "skipped: not installed".) The self-test runs every check
# whose libraries import, with the local layer spec unless TE is there, under a budget of $BUDGET
# seconds (default 360): the checks not started by then are reported as skipped, most important first.
# Exit status: the self-test's (1 if a check failed), or 2 when the stack cannot even import.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out="${1:-${OUT:-gpu_check}}"
[ $# -gt 0 ] && shift
mkdir -p "$out"
PY="${PYTHON:-python3}"
budget="${BUDGET:-360}"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  site="${TMPDIR:-/tmp}/megatron-hapo-site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || {
    echo "device_check: installing the carried wheels in .whl/ failed" | tee "$out/gpu_selftest.log"; exit 2; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c "import torch, megatron.core, transformers" 2>"$out/import_error.txt"; then
  echo "device_check: the stack does not import ($(tail -n 1 "$out/import_error.txt")); carry the wheels named in" \
       "this script's header in .whl/" | tee "$out/gpu_selftest.log"
  exit 2
fi
timeout $((${budget%.*} + 180)) "$PY" tools/gpu_selftest.py --budget "$budget" --out "$out/gpu_selftest.json" \
  --table "$out/gpu_selftest.txt" "$@" 2>&1 | tee "$out/gpu_selftest.log"
exit "${PIPESTATUS[0]}"
