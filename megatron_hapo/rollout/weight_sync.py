"""Trainer → engine weights: the policy's one walk of its weights (`MegatronPolicy.hf_weights`:
HF names, TP-merged, PP-streamed in buckets) into the engine in place.

Everything stays on the policy's device: on GPU the tensors go from Megatron's parameters to the
engine's without a host copy (TP gathers and PP broadcasts over NCCL); the engine (any inference
TP) slices what it needs while loading.
"""
from __future__ import annotations

import time
from typing import Dict

from ..models.mapping import hf_param_shapes


def sync_policy_to_engine(policy, engine, bucket_bytes: int = 64 * 2**20) -> Dict[str, float]:
    """Pushes the policy's current weights into the engine in place; returns bytes and seconds."""
    t0 = time.perf_counter()
    policy.check_finite()  # before anything reaches the engine: it keeps its previous weights
    shapes = hf_param_shapes(policy.spec)
    nbytes = engine.update_weights(policy.hf_weights(bucket_bytes), names_and_shapes=shapes)
    return {"weight_sync_bytes": float(nbytes), "weight_sync_s": time.perf_counter() - t0}
