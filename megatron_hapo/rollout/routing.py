"""Routing replay, the engine's half: which experts each token was routed to at rollout.

A forward hook on every MoE layer's router (`model.layers.L.mlp.gate` in vLLM's Qwen3-MoE) takes
the router logits of each forward step and keeps their top-k expert ids (the choice vLLM's fused
MoE makes: the top-k of softmax(logits), renormalized or not); with it the step's layout as the
model runner prepared it (request ids, query start offsets, absolute positions). After a
generation the records are resolved per request: experts[layer, position, k] for every position
the engine fed through the model (the prompt and every response token but the last, whose routing
only shapes logits nobody samples from).

Positions are recorded when they are computed, so the engine runs without prefix caching while
recording (a cached prompt block is not recomputed), and eagerly (a captured CUDA graph does not
run Python hooks). Megatron replays the records in the old pass and the update
(`MegatronPolicy`, `moe_enable_routing_replay`).
"""
from __future__ import annotations

import threading
from typing import Dict, List

import numpy as np
import torch

_RECORDERS: Dict[int, "RoutingRecorder"] = {}  # by id of the worker's model runner


class RoutingRecorder:
    def __init__(self, runner, layers: Dict[str, int], top_k: int, num_experts: int):
        self.runner, self.layers, self.top_k = runner, layers, top_k
        self.dtype = torch.uint8 if num_experts <= 256 else torch.int16
        self.lock = threading.Lock()
        self.steps: List[dict] = []
        self.enabled = False

    def hook(self, layer: int, logits: torch.Tensor) -> None:
        if not self.enabled:
            return
        top = logits.float().topk(self.top_k, dim=-1).indices.to(self.dtype)  # softmax keeps the order
        n = logits.shape[0]
        with self.lock:
            if layer == 0 or not self.steps:  # the first MoE layer opens a forward step
                r = self.runner
                num_reqs = r.input_batch.num_reqs
                self.steps.append({"req_ids": list(r.input_batch.req_ids[:num_reqs]),
                                   "starts": r.query_start_loc.cpu[: num_reqs + 1].clone(),
                                   "positions": r.positions[:n].to("cpu", copy=True), "top": {}})
            self.steps[-1]["top"][layer] = top.to("cpu", non_blocking=True)

    def take(self) -> List[dict]:
        with self.lock:
            steps, self.steps = self.steps, []
        return steps


def install(worker) -> int:
    """Runs inside the engine's worker (collective_rpc): a recorder with a hook per MoE router.
    Returns the number of MoE layers found."""
    runner = worker.model_runner
    model = runner.model
    cfg = runner.model_config.hf_config
    gates = {name: module for name, module in model.named_modules() if name.endswith(".mlp.gate")}
    moe_layers = sum(1 for name, _ in model.named_modules() if name.endswith(".mlp.experts"))
    problem = router_problem({n: getattr(m, "output_size", None) for n, m in gates.items()}, moe_layers,
                             int(cfg.num_experts))
    if problem:
        arch = ",".join(getattr(cfg, "architectures", None) or [type(model).__name__])
        raise ValueError(f"rollout.routing_replay: not supported for {arch}: {problem}")
    layers = {name: int(name.split(".layers.")[1].split(".")[0]) for name in gates}
    recorder = RoutingRecorder(runner, layers, int(cfg.num_experts_per_tok), int(cfg.num_experts))
    for name, module in gates.items():
        layer = layers[name]
        module.register_forward_hook(lambda mod, inputs, output, layer=layer: recorder.hook(
            layer, output[0] if isinstance(output, tuple) else output))
    _RECORDERS[id(runner)] = recorder
    return len(gates)


def router_problem(gate_outputs: Dict[str, object], moe_layers: int, num_experts: int) -> str:
    """Why the hooks cannot record this model's routing, or "": every MoE layer must have its own
    `mlp.gate` that vLLM calls with the routed experts' logits alone. Families whose router is fused
    with a shared-expert gate (one linear of num_experts + 1 outputs) or called inside the fused MoE
    kernel never run such a module, and a hook there would record nothing or the wrong columns."""
    if len(gate_outputs) != moe_layers:
        return (f"{moe_layers} MoE layers but {len(gate_outputs)} `mlp.gate` routers that vLLM calls on its own "
                "(the router is fused into another module)")
    wrong = {n: o for n, o in gate_outputs.items() if o is not None and o != num_experts}
    if wrong:
        name, out = next(iter(wrong.items()))
        return (f"router {name} has {out} outputs for {num_experts} experts (a gate fused with a shared-expert gate)")
    return ""


def set_enabled(worker, enabled: bool) -> None:
    _RECORDERS[id(worker.model_runner)].enabled = enabled


def take(worker) -> List[dict]:
    return _RECORDERS[id(worker.model_runner)].take()


def resolve(steps: List[dict], lengths: Dict[str, int], num_layers: int, top_k: int) -> Dict[str, np.ndarray]:
    """{external request id: experts [num_layers, length, top_k]} from the recorded steps; length =
    the positions the request fed (prompt + response − 1). vLLM's internal ids are the external id
    with a suffix ("7-1a2b3c4d"). A position never recorded raises: the records would be wrong."""
    out = {rid: np.full((num_layers, n, top_k), -1, dtype=np.int16) for rid, n in lengths.items()}
    for step in steps:
        starts = step["starts"].tolist()
        positions = step["positions"]
        for r, internal in enumerate(step["req_ids"]):
            rid = internal.rsplit("-", 1)[0] if internal not in out else internal
            if rid not in out:
                continue  # a request of another generate call (not ours to keep)
            lo, hi = starts[r], starts[r + 1]
            pos = positions[lo:hi].numpy()
            keep = pos < out[rid].shape[1]
            for layer, top in step["top"].items():
                out[rid][layer, pos[keep]] = top[lo:hi].numpy()[keep]
    for rid, experts in out.items():
        if (experts < 0).any():
            missing = int((experts[0, :, 0] < 0).sum())
            raise RuntimeError(f"routing replay: request {rid} has {missing} positions without recorded experts "
                               "(was prefix caching on, did a CUDA graph run the forward, or does this model route inside a module "
                               "other than its `mlp.gate`?)")
    return out
