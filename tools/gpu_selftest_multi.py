"""The 2-rank part of the GPU self-test (run by tools/gpu_selftest.py under torchrun; also runs on
CPU with gloo: `torchrun --nproc-per-node 2 tools/gpu_selftest_multi.py WORK`).

WORK holds `model/` (the self-test's HF model) and `reference.pt` from one rank at TP 1: log-probs
of a batch, the HF weights after one DAPO step on it, and the batch. Here: TP 2, DP 2 and PP 2
each compute the same log-probs and take the same step (DP 2: half the rows per rank, one global
token-mean); an inference-TP-2 engine scores the batch; then (`--engines-tp1`) every rank builds
its own TP-1 engine on its own device. Prints one line `MULTI {"figure": ..., "ok": ...}` on rank 0.
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_hapo import device as dev  # noqa: E402


def policy_for(spec, tp, pp):
    from megatron_hapo.algorithms import AlgorithmConfig
    from megatron_hapo.training.parallel import init_model_parallel
    from megatron_hapo.training.policy import MegatronPolicy, PolicyConfig

    init_model_parallel(tp, pp)
    return MegatronPolicy(spec, PolicyConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             micro_batch_size=2, lr=1e-3, lr_warmup_steps=0, adam_eps=1e-6),
                          AlgorithmConfig.preset("dapo"))


def main() -> int:
    from megatron.core import parallel_state as ps

    from megatron_hapo.models.convert import read_hf_tensors
    from megatron_hapo.models.hf_config import ModelSpec
    from megatron_hapo.rollout.engine import RolloutEngine
    from megatron_hapo.training.policy import PolicyBatch

    work = sys.argv[1]
    engines_tp1 = "--engines-tp1" in sys.argv
    model_dir = os.path.join(work, "model")
    ref = torch.load(os.path.join(work, "reference.pt"))
    spec = ModelSpec.from_hf(model_dir)
    hf = read_hf_tensors(model_dir)
    figures, ok = [], True
    tol = 2e-3 if dev.is_gpu() else 1e-4
    ids, mask, adv = ref["input_ids"], ref["loss_mask"], ref["advantages"]
    d = dev.device()
    if not engines_tp1:
        for name, tp, pp in (("TP 2", 2, 1), ("DP 2", 1, 1), ("PP 2", 1, 2)):
            policy = policy_for(spec, tp, pp)
            policy.load_hf_state_dict(hf)
            logp, _ = policy.compute_logprobs(PolicyBatch(ids.to(d), mask.to(d)))
            d_logp = (logp.cpu() - ref["logp"]).abs().max().item()
            rows = slice(None)
            if ps.get_data_parallel_world_size() == 2:
                half = ids.shape[0] // 2
                rows = slice(ps.get_data_parallel_rank() * half, (ps.get_data_parallel_rank() + 1) * half)
            m = policy.train_step(PolicyBatch(ids[rows].to(d), mask[rows].to(d), advantages=adv[rows].to(d),
                                              old_logp=ref["logp"][rows].to(d)))
            after = policy.hf_state_dict()
            d_w = max((after[k].float() - ref["after"][k].float()).abs().max().item() for k in ref["after"])
            # one Adam step moves each weight by about ±lr whatever the gradient's size: the loss and the
            # gradient norm are what show a wrong gradient
            d_g = abs(m["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"]
            d_l = abs(m["loss"] - ref["loss"])  # absolute: at ratio 1 the loss itself is near zero
            ok = ok and d_logp < tol and d_w < tol and d_g < tol and d_l < tol
            figures.append(f"{name}: |Δlogp| {d_logp:.1e} rel Δgrad-norm {d_g:.1e} |Δloss| {d_l:.1e} |Δw| {d_w:.1e}")
        engine = RolloutEngine(model_dir, max_model_len=128, kv_cache_memory_bytes=64 * 2**20, tensor_parallel_size=2,
                               dtype="float32", gpu_memory_utilization=0.2)
    else:
        from megatron_hapo.training.parallel import init_distributed

        init_distributed()
        free_before = torch.cuda.mem_get_info()[0] if dev.is_gpu() else 0
        engine = RolloutEngine(model_dir, max_model_len=128, kv_cache_memory_bytes=64 * 2**20, seed=dist.get_rank(),
                               dtype="float32", gpu_memory_utilization=0.2)
        if dev.is_gpu():  # this rank's engine took memory on this rank's GPU
            took = free_before - torch.cuda.mem_get_info()[0]
            on_own = torch.cuda.current_device() == dev.local_rank() and took > 0
            ok = ok and on_own
            figures.append(f"engine on cuda:{torch.cuda.current_device()} took {took / 2**20:.0f} MiB there")
    eng = torch.tensor(engine.score(ids.tolist()))
    d_eng = (eng - ref["logp"][:, :-1])[mask[:, :-1]].abs().max().item()
    ok = ok and d_eng < (1e-2 if dev.is_gpu() else 1e-4)
    figures.append(("two TP-1 engines" if engines_tp1 else "inference-TP-2 engine") + f": |Δlogp| vs trainer {d_eng:.1e}")
    flags = torch.tensor([float(ok)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    if dist.get_rank() == 0:
        print("MULTI " + json.dumps({"figure": "; ".join(figures), "ok": bool(flags.item())}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
