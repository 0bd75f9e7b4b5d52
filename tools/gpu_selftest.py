"""The GPU self-test: proves the GPU path layer by layer in minutes, the first time a GPU is at hand.

    python tools/gpu_selftest.py [--out selftest.json] [--table selftest.txt] [--budget SECONDS]
                                 [--layer-spec auto|te|local] [--skip trainer,multi] [--only NAME,...]
    make gpu-check
    tools/device_check.sh OUT_DIR      # a bare GPU machine: wheels carried along, a 6-minute budget

Checks run in tiers, so that a short lease yields the most important results first and the first
failure names the broken layer: the stack (native imports, collectives on the mixed backend) →
Transformer Engine (HF weights into the TE spec vs transformers and the local spec; a local-spec
checkpoint into the TE model) → the training path, which needs neither vLLM nor TE (placement of
parameters, gradients and batches; vocab-parallel log-probs/entropy at V = 151,936 vs float64; a bf16
HAPO step with the distributed optimizer; packed vs padded micro-batches; save/resume; the weights
walk on the device; the temperature processor free of device syncs; a MoE step) → the engines (an
engine built after the policy, records vs recomputation, weight sync, sleep/wake; the MoE engine with
routing replay and an engine with CUDA graphs each in a process of its own) → the trainer and its
resume → measurements (the temperature kernel and eager path in GB/s, the update's MFU on a 0.5 B
model) → with 2+ GPUs, parallel layouts against one GPU. One module a tier in `tools/selftest/`
(core: the registry, context and shared helpers; stack, te, training, engines, trainer, measure, multi;
driver: the budget, isolated children, the JSON and table after every check); this file is the entry.

A check whose library is not installed (vLLM, Transformer Engine) says "skipped: not installed";
without CUDA the same code runs on the CPU wherever a check has a CPU meaning (local spec, fp32) and
says "skipped: ..." for the rest: a check never reports a pass it did not measure. Output: one table
(check, status, seconds, peak GPU memory, figure) and a JSON file; exit status 1 if any failed.
"""
import os
import sys

TOOLS = os.path.dirname(os.path.abspath(__file__))
# tools/ (the selftest package) and the repository (megatron_hapo): on a bare machine neither is installed
sys.path[:0] = [TOOLS, os.path.dirname(TOOLS)]

from selftest.driver import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
