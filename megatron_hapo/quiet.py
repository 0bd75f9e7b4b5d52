"""The console keeps to what a user acts on: the third-party warnings known to be harmless here are
named in one place (KNOWN) and filtered by default; `log.verbose=true` (or `--verbose`) shows them.

Each entry names the library that says it (its warnings are filtered only when they come from that
library's modules or logger, never from megatron_hapo) and why it needs no action. Python warnings
are filtered with `warnings.filterwarnings`. vLLM's log lines: vLLM would replace its logger's handler
whenever an engine starts (a `dictConfig`), so the engine module tells it not to configure logging
(VLLM_CONFIGURE_LOGGING=0) and `vllm_handler()` gives the `vllm` logger one handler of ours, in
vLLM's format and level (VLLM_LOGGING_LEVEL), that drops the known lines.
"""
from __future__ import annotations

import logging
import re
import warnings

# (where: a Python-warning module regex or "vllm" for vLLM's logger, message regex, why it is harmless)
KNOWN = [
    (r"megatron\.core\..*", r"Transformer Engine and Apex are not installed",
     "CPU or a TE-less GPU: Megatron uses its torch implementations, which the suite checks"),
    (r"megatron\.core\..*", r"Apex is not installed\. Falling back to Torch Norm",
     "the local spec's norms are torch's (checked against transformers)"),
    (r"megatron\.core\..*", r"full scope is deprecated",
     "Megatron's own TransformerConfig default for cuda_graph_scope; no CUDA graphs in training"),
    (r"(vllm|torch)\..*", r"`torch\.distributed\.reduce_op` is deprecated",
     "vLLM's kernel dispatcher touches the deprecated alias while importing"),
    (r"(megatron|torch)\..*", r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
     "megatron-core 0.16.1's distributed optimizer calls it; the replacement is not in 0.16.1"),
    ("vllm", r"doesn't allow to use `torch\.set_num_threads` after the thread binding",
     "vLLM's CPU worker binds its threads once; repeated on every engine start"),
    ("vllm", r"is not found in LD_PRELOAD",
     "tcmalloc / Intel OpenMP are optional speed-ups of vLLM's CPU backend"),
    ("vllm", r"Enforce eager set, disabling torch\.compile",
     "rollout.enforce_eager=true is the setting asked for (CPU, or GPU until its CUDA-graphs check)"),
    ("vllm", r"Inductor compilation was disabled by user settings",
     "follows from enforce_eager"),
    ("vllm", r"Triton is not installed\. triton-cpu is expected",
     "the CPU backend's Triton kernels are optional"),
    ("vllm", r"Reset SSM cache type to float32",
     "a setting for state-space models; none is used"),
    ("vllm", r"Triton is installed, but doesn't include CPU backend",
     "CPU: vLLM uses its torch kernels (the GPU image's Triton is a CUDA build)"),
    ("vllm", r"is already registered\. Overwriting",
     "a second engine in the process (the demo's trainers) registers vLLM's kernels again"),
    ("vllm", r"Unknown vLLM environment variable detected: VLLM_DIST_IDENT",
     "vLLM sets that variable itself when an engine starts, and its own check does not know it"),
    ("vllm", r"The global random seed is set to",
     "an in-process engine seeds the process's RNGs; every draw of ours is seeded explicitly and "
     "the RNG states are checkpointed and restored on resume"),
    ("vllm", r"does not officially support disabling chunked prefill",
     "CPU: the engine turns chunked prefill off on purpose (vLLM's CPU runner cannot rewind a seeded request "
     "whose prefill is split; rollout/engine.py), with max_num_batched_tokens ≥ max_model_len; "
     "tests/test_rollout.py checks a batch over one step's budget against the same prompts alone"),
]

_STATE = {"verbose": False, "vllm_filter": None}


class _VllmFilter(logging.Filter):
    def __init__(self, patterns):
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        if _STATE["verbose"]:
            return True
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def install(verbose: bool = False) -> None:
    """Filters the KNOWN warnings from here on (unless verbose); call before the libraries load."""
    _STATE["verbose"] = bool(verbose)
    if not verbose:
        for where, message, _ in KNOWN:
            if where != "vllm":
                warnings.filterwarnings("ignore", message=message, module=where)


def vllm_handler() -> None:
    """The `vllm` logger's one handler (idempotent); the engine module calls it before importing vLLM."""
    import os

    if _STATE["vllm_filter"] is not None:
        return
    logger = logging.getLogger("vllm")
    _STATE["vllm_filter"] = _VllmFilter([m for where, m, _ in KNOWN if where == "vllm"])
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s",
                                           datefmt="%m-%d %H:%M:%S"))
    handler.addFilter(_STATE["vllm_filter"])
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper())
    logger.propagate = False
