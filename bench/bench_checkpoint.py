"""Peak host memory of a training-checkpoint save with the distributed optimizer, per data-parallel rank:
the optimizer state gathered onto every data-parallel rank (Megatron's fully_reshardable default,
the project's form before) against gathered onto data-parallel rank 0 only, over gloo
(`distrib_optim_fully_reshardable_mem_efficient`, the form now).

    MALLOC_MMAP_THRESHOLD_=65536 .venv/bin/python bench/bench_checkpoint.py [--dp 2] [--hidden 512] [--layers 8]

A Qwen2-shaped model built in code on --dp gloo ranks (DP only); each rank saves the same step twice
into fresh folders, once in each form, in the same processes, and reports the peak resident memory
above its level before the save (/proc VmHWM after clear_refs; MALLOC_MMAP_THRESHOLD_ returns freed
tensors to the kernel so the figures are faithful) and the save's wall time. The model's fp32 optimizer
state (main params, exp_avg, exp_avg_sq: 12 bytes a parameter) is printed for scale: the old form
needs about that much on every rank, the new one on rank 0 and a 1/DP share elsewhere.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def worker(rank, world, hidden, layers, root):
    import torch
    import transformers
    from megatron.core import dist_checkpointing

    from megatron_hapo import device as dev
    from megatron_hapo.algorithms import AlgorithmConfig
    from megatron_hapo.memory import PeakRSS
    from megatron_hapo.models.hf_config import ModelSpec
    from megatron_hapo.training.checkpoint import OPTIMIZER_METADATA, _sharded
    from megatron_hapo.training.parallel import init_model_parallel
    from megatron_hapo.training.policy import MegatronPolicy, PolicyBatch, PolicyConfig

    init_model_parallel(1, 1)
    cfg = transformers.AutoConfig.for_model(
        model_type="qwen2", vocab_size=32768, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    policy = MegatronPolicy(ModelSpec.from_hf(cfg), PolicyConfig(micro_batch_size=2, lr=1e-4, lr_warmup_steps=0,
                                                                 use_distributed_optimizer=True),
                            AlgorithmConfig.preset("dapo"))
    ids = torch.randint(0, 32000, (2, 32), generator=torch.Generator().manual_seed(rank))
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[:, -1] = False
    old, _ = policy.compute_logprobs(PolicyBatch(ids, mask))
    policy.train_step(PolicyBatch(ids, mask, advantages=torch.tensor([1.0, -1.0]), old_logp=old))  # optimizer state exists
    params = sum(p.numel() for c in policy.chunks for p in c.module.parameters())
    out = {"params": params}
    forms = (("every DP rank (before)", {"distrib_optim_sharding_type": "fully_reshardable"}),
             ("DP rank 0 over gloo (now)", OPTIMIZER_METADATA))
    for rep in range(2):  # the first round warms code paths up; the second is reported
        for name, metadata in forms:
            folder = os.path.join(root, f"{rep}-{name[:3]}")
            if rank == 0:
                os.makedirs(folder)
            torch.distributed.barrier()
            t0 = time.perf_counter()
            with PeakRSS() as peak:
                with dev.megatron_scope():
                    dist_checkpointing.save(_sharded(policy, metadata=metadata), folder)
            out[name] = {"extra": peak.extra, "seconds": time.perf_counter() - t0}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    a = p.parse_args()
    from megatron_hapo.memory import faithful
    from megatron_hapo.spawn import run_ranks

    if not faithful():
        print("note: MALLOC_MMAP_THRESHOLD_ is not set: glibc may keep freed memory, the peaks read high")
    with tempfile.TemporaryDirectory() as root:
        res = run_ranks(a.dp, worker, a.hidden, a.layers, root, timeout=1800)
    params = res[0]["params"]
    state = 12 * params
    print(f"\ncheckpoint save, distributed optimizer, DP {a.dp} (gloo, CPU); model {params / 1e6:.1f} M parameters "
          f"(hidden {a.hidden}, {a.layers} layers, vocab 32768); fp32 optimizer state {state / 2**20:.0f} MiB")
    names = [k for k in res[0] if k != "params"]
    base = names[0]
    print("| rank | optimizer state gathered onto | peak extra host memory | vs before | save s |")
    print("|---|---|---|---|---|")
    for rank, ranks_result in enumerate(res):
        for name in names:
            r = ranks_result[name]
            ratio = r["extra"] / max(ranks_result[base]["extra"], 1)
            print(f"| {rank} | {name} | {r['extra'] / 2**20:.0f} MiB | {ratio:.2f}x | {r['seconds']:.2f} |")


if __name__ == "__main__":
    main()
