"""What megatron-core 0.16.1 assumes of libraries a machine may lack (Transformer Engine, Apex, psutil),
covered by what is missing, on any device, once, in one place.

CUDA-specific assumptions are another matter (`cpu_shims`, applied only without CUDA); these hold on a
GPU too: a bare GPU machine without TE or Apex (the lent H200, a user's own node) trains with torch's
AdamW and Megatron's local MoE helpers exactly as the CPU does. Each shim is installed only when its
library is absent, and `apply()` returns which were installed:

- `adamw_step` (neither TE nor Apex: Megatron falls back to torch's AdamW): the distributed
  optimizer's fully_reshardable load copies every key of a parameter's optimizer state from the
  checkpoint; torch AdamW's per-parameter `step` (TE's and Apex's FusedAdam keep none) is not among
  the saved tensors but restored from the param groups just before, so the load would fail with
  `KeyError: 'step'` → the current `step` is kept.
- `moe_te_names` (no TE): `moe_utils` defines `te_general_gemm` and the `fused_*` helpers only when
  Transformer Engine imports, yet the router tests `te_general_gemm is not None` (a `NameError`
  otherwise) → defined as None, which its own checks read as "not available".
- `psutil` (not installed): the asynchronous checkpoint writer's forked workers call
  `_process_memory()` (psutil) before their `try`; without psutil each raises before it marks its
  task done and the parent's `join()` never returns (a checkpoint save that hangs) → the resident
  set size read from /proc (0 where there is none; it is only logged at debug level).
"""
from __future__ import annotations

import os
from typing import List, Optional

_APPLIED: Optional[List[str]] = None


def apply() -> List[str]:
    """Installs the shims whose library is missing (once); returns their names."""
    global _APPLIED
    if _APPLIED is None:
        _APPLIED = [name for name, fn in (("adamw_step", _adamw_step), ("moe_te_names", _moe_te_names),
                                          ("psutil", _no_psutil)) if fn()]
    return list(_APPLIED)


def _adamw_step() -> bool:
    from megatron.core import optimizer as mopt

    if not getattr(mopt, "USING_PYTORCH_OPTIMIZER", False):
        return False  # TE's or Apex's FusedAdam: no per-parameter step
    from megatron.core.optimizer import distrib_optimizer as dopt

    set_states = dopt.DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_states(self, model_param, tensors):
        if "step" not in tensors:
            group, order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group]["params"][order]]
            if "step" in state:
                tensors = {**tensors, "step": state["step"]}
        return set_states(self, model_param, tensors)

    dopt.DistributedOptimizer._set_main_param_and_optimizer_states = _set_states
    return True


MOE_TE_NAMES = ("te_general_gemm", "fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss", "fused_permute",
                "fused_permute_with_probs", "fused_sort_chunks_by_index", "fused_sort_chunks_by_index_with_probs",
                "fused_topk_with_score_function", "fused_unpermute")


def _moe_te_names() -> bool:
    from megatron.core.transformer.moe import moe_utils

    missing = [name for name in MOE_TE_NAMES if not hasattr(moe_utils, name)]
    for name in missing:
        setattr(moe_utils, name, None)
    return bool(missing)


def _rss_from_proc() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _no_psutil() -> bool:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "HAVE_PSUTIL", True):
        return False
    filesystem_async._process_memory = _rss_from_proc
    return True
